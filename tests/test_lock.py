"""The locks agree with pyproject.toml: every declared dependency is pinned inside its range, with
hashes, and the runtime lock is the dev lock's runtime part. A failure here means: run
``requirements/refresh`` (see README, "Run the tests")."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DEV_LOCK = ROOT / "requirements" / "dev.lock"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
REFRESH = "run requirements/refresh and then the tests"
# How uv marks a pin that pyproject.toml asks for (as opposed to one that something else needs).
DIRECT = "adevents (pyproject.toml)"


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: tuple[str, ...]
    direct: bool


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    return parse_lock(path.read_text(), path.name)


def parse_lock(text: str, source: str) -> dict[NormalizedName, Pin]:
    """``name==version`` entries of a uv/pip-tools lock, with their hashes and ``# via`` notes."""
    pins: dict[NormalizedName, Pin] = {}
    # Every entry starts at column 0; its hashes and notes are indented below it.
    for entry in re.split(r"\n(?=\S)", text):
        if not entry.strip() or entry.startswith("#"):
            continue
        line = entry.split(" \\", 1)[0].split("\n", 1)[0].strip()
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", (
            f"{source}: {line!r} is not an exact pin"
        )
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{source}: {name} is pinned twice"
        pins[name] = Pin(
            version=Version(specifiers[0].version),
            hashes=tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})\b", entry)),
            direct=DIRECT in entry,
        )
    return pins


def declared(*, extras: bool) -> list[Requirement]:
    """pyproject.toml's dependencies (and those of every extra) that apply on this platform."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    if extras:
        lines += [line for group in project["optional-dependencies"].values() for line in group]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


@pytest.mark.parametrize("lock", [DEV_LOCK, RUNTIME_LOCK], ids=lambda p: p.name)
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    pins = read_lock(lock)
    assert pins, f"{lock.name} pins nothing"
    unhashed = sorted(name for name, pin in pins.items() if not pin.hashes)
    assert not unhashed, f"{lock.name} has pins without a hash: {unhashed}; {REFRESH}"


@pytest.mark.parametrize(
    ("lock", "extras"), [(DEV_LOCK, True), (RUNTIME_LOCK, False)], ids=["dev", "runtime"]
)
def test_every_declared_dependency_is_locked_inside_its_range(lock: Path, extras: bool) -> None:
    pins = read_lock(lock)
    problems = []
    for requirement in declared(extras=extras):
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement} is not in {lock.name}")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement} but {lock.name} pins {pin.version}")
    assert not problems, f"{'; '.join(problems)}: {REFRESH}"


@pytest.mark.parametrize(
    ("lock", "extras"), [(DEV_LOCK, True), (RUNTIME_LOCK, False)], ids=["dev", "runtime"]
)
def test_the_lock_holds_no_dependency_pyproject_dropped(lock: Path, extras: bool) -> None:
    wanted = {canonicalize_name(r.name) for r in declared(extras=extras)}
    # uv notes which pins pyproject.toml asked for: exactly the declared ones, no more (and, were
    # that note's wording to change, no fewer, so this cannot pass vacuously).
    marked = {name for name, pin in read_lock(lock).items() if pin.direct}
    assert marked == wanted, (
        f"{lock.name} pins for adevents {sorted(marked - wanted)} that pyproject.toml no longer "
        f"declares, and misses {sorted(wanted - marked)}; {REFRESH}"
    )


def test_the_image_runs_the_versions_the_tests_ran_on() -> None:
    dev = read_lock(DEV_LOCK)
    runtime = read_lock(RUNTIME_LOCK)
    differ = sorted(
        f"{name} {pin.version} (dev.lock: {dev[name].version if name in dev else 'absent'})"
        for name, pin in runtime.items()
        if name not in dev or dev[name].version != pin.version
    )
    assert not differ, f"runtime.lock differs from dev.lock: {differ}; {REFRESH}"


def test_the_lock_reader_reads_what_uv_writes() -> None:
    """The reader above, on a sample of what uv writes."""
    sample = (
        "# This file was autogenerated by uv via the following command:\n"
        "#    requirements/refresh\n"
        f"duckdb==2.0.1 \\\n    --hash=sha256:{'a' * 64} \\\n    --hash=sha256:{'b' * 64}\n"
        "    # via\n    #   -c requirements/dev.lock\n    #   adevents (pyproject.toml)\n"
        f"h11==0.16.0 \\\n    --hash=sha256:{'c' * 64}\n    # via httpcore\n"
    )
    assert parse_lock(sample, "sample") == {
        "duckdb": Pin(Version("2.0.1"), ("a" * 64, "b" * 64), direct=True),
        "h11": Pin(Version("0.16.0"), ("c" * 64,), direct=False),
    }
