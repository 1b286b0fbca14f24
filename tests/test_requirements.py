"""The ways to install the project agree: pyproject.toml holds the one list, requirements.txt
installs all of it, requirements-lock.txt pins a version inside every range, environment.yml
installs requirements.txt on the lock's Python, and the Ray hint names pyproject's range."""

import re
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest brings tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
DECLARED = [Requirement(r) for r in PROJECT["dependencies"] + [r for rs in EXTRAS.values() for r in rs]]


def lines(name: str) -> list[str]:
    return [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()
            if line.split("#")[0].strip()]


def locked() -> dict[str, Version]:
    pins = {}
    for line in lines("requirements-lock.txt"):
        name, _, version = line.partition("==")
        assert version, f"requirements-lock.txt: {line!r} is not a pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_requirements_txt_installs_the_project_with_every_extra():
    (line,) = lines("requirements.txt")
    match = re.fullmatch(r"-e \.\[(.+)\]", line)
    assert match, f"requirements.txt should install the project itself, not {line!r}"
    assert set(match[1].split(",")) == set(EXTRAS)


def test_the_lock_pins_a_version_inside_every_declared_range():
    pins = locked()
    for requirement in DECLARED:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements-lock.txt lacks {name}: regenerate it with .ci/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements-lock.txt pins {name}=={pins[name]}, outside {requirement}: regenerate it")
    assert "lora-tutorial" not in pins  # the project itself is installed from the clone (-e .)


def test_upper_bounds_where_a_major_release_breaks_us_and_none_on_torch():
    bounded = {canonicalize_name(r.name) for r in DECLARED if any(s.operator in ("<", "<=", "==", "~=")
                                                                 for s in r.specifier)}
    assert {"pytest", "pytest-xdist", "nbval", "peft", "transformers", "ray"} <= bounded
    assert not {"torch", "torchvision"} & bounded, "users bring their own GPU build of torch"


def test_environment_yml_installs_requirements_txt_on_the_locks_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == [["-r requirements.txt"]], "conda users get other versions than pip users"
    assert {re.split(r"[=<>]", d)[0] for d in conda} == {"python", "pip"}
    python = next(d for d in conda if d.startswith("python"))
    lock_python = re.search(r"Python (\d+\.\d+)", (ROOT / "requirements-lock.txt").read_text())[1]
    assert python == f"python={lock_python}"


def test_the_ray_hint_names_pyprojects_range():
    from lora_tutorial.tools.engines import RAY_REQUIREMENT

    assert [RAY_REQUIREMENT] == EXTRAS["ray"]
