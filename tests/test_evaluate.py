"""Batched evaluation against a one-image-at-a-time loop (the post's own loop: benchmarks/bench_tutorial.py,
which checks that both give the same answers)."""

import pytest
import torch

from lora_tutorial import OversizedMLP, evaluate


def per_image_loop(model, images, labels):
    """A plain reference: one image at a time, counting right and wrong answers per digit."""
    correct, wrong, confusion = 0, [0] * 10, [[0] * 10 for _ in range(10)]
    with torch.no_grad():
        for x, y in zip(images, labels, strict=True):
            guess = int(torch.argmax(model(x.view(-1, 784))[0]))
            confusion[int(y)][guess] += 1
            if guess == int(y):
                correct += 1
            else:
                wrong[int(y)] += 1
    return correct, wrong, confusion


def test_batched_evaluation_matches_the_per_image_loop(mnist):
    torch.manual_seed(0)
    model = OversizedMLP()
    images, labels = mnist.test_images[:600], mnist.test_labels[:600]
    correct, wrong, confusion = per_image_loop(model, images, labels)
    for batch_size in (10_000, 128, 7):
        result = evaluate(model, images, labels, batch_size=batch_size)
        assert (result.correct, result.wrong_counts, result.confusion) == (correct, wrong, confusion)
        assert result.total == 600 and result.accuracy == correct / 600
    assert sum(wrong) == 600 - correct  # an untrained model gets plenty wrong: a real check


def test_report_worst_digit_and_per_digit_accuracy(mnist):
    torch.manual_seed(1)
    result = evaluate(OversizedMLP(), mnist.test_images[:300], mnist.test_labels[:300])
    report = result.report().splitlines()
    assert f"{result.accuracy:.3f}" in report[0] and f"{result.correct:,}" in report[0]
    assert len(report) == 11 and all(line.endswith(f"{d}: {w}") for d, (line, w) in
                                     enumerate(zip(report[1:], result.wrong_counts, strict=True)))
    worst = result.worst_digit()
    assert result.wrong_counts[worst] == max(result.wrong_counts)
    accuracy = result.per_digit_accuracy()
    for digit, row in enumerate(result.confusion):
        assert accuracy[digit] == row[digit] / sum(row)


def test_digit_summary_is_what_fine_tuning_on_a_digit_is_judged_by():
    from lora_tutorial.evaluate import from_confusion
    confusion = [[0] * 10 for _ in range(10)]
    for d in range(10):
        confusion[d][d] = 9 if d != 9 else 6
        confusion[d][(d + 1) % 10] = 1 if d != 9 else 4
    result = from_confusion(confusion)
    summary = result.digit_summary(9)
    assert summary == {"target_wrong": 4, "others_accuracy": pytest.approx(0.9), "accuracy": 0.87}
