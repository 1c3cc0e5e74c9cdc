"""Poison inputs are isolated: any entry of incoming/ that cannot be processed is quarantined
with a reason, once, and the consumer moves on; odd and long names never break a path.

Each case runs a real, long-running ``adevents consume`` process (it must still be running
afterwards); a hypothesis property then runs many names and entry kinds through the consumer
in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from hardening import (
    TIMEOUT_S,
    ConsumerProcess,
    base_env,
    drained,
    lake_table,
    ledger,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyarrow import ipc

from pipeline.settings import Settings
from pipeline.spool import MAX_FILE_BYTES, display_name, internal_stem
from pipeline.testing import consume_once, event_table

NOW_MS = int(__import__("time").time() * 1000)
NAME_MAX = 255


def arrow_bytes(ids: list[str]) -> bytes:
    table = event_table(ids, time_ms=NOW_MS)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write(table)
    return bytes(sink.getvalue().to_pybytes())


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


#: (entry name as bytes, expected ledger status, how to make it)
Maker = Callable[[Path, Path], None]


def _valid(ids: list[str]) -> Maker:
    return lambda path, outside: write(path, arrow_bytes(ids))


def _garbage(path: Path, outside: Path) -> None:
    write(path, b"not arrow at all")


def _link_out(path: Path, outside: Path) -> None:
    target = outside / "elsewhere.arrow"
    write(target, arrow_bytes(["outside-1", "outside-2"]))
    path.symlink_to(target)


def _dangling(path: Path, outside: Path) -> None:
    path.symlink_to(outside / "does-not-exist.arrow")


def _link_to_dir(path: Path, outside: Path) -> None:
    (outside / "a-dir.arrow").mkdir()
    path.symlink_to(outside / "a-dir.arrow")


def _link_loop(path: Path, outside: Path) -> None:
    path.symlink_to(path.name)  # itself: ELOOP


def _directory(path: Path, outside: Path) -> None:
    path.mkdir()
    write(path / "inside.arrow", arrow_bytes(["in-a-dir"]))


def _fifo(path: Path, outside: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path, outside: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFSOCK)


def _hard_link_out(path: Path, outside: Path) -> None:
    target = outside / "hard.arrow"
    write(target, arrow_bytes(["outside-hard"]))
    os.link(target, path)


def _oversized(path: Path, outside: Path) -> None:
    with open(path, "wb") as fh:  # sparse: no disk space, no memory
        fh.truncate(MAX_FILE_BYTES + 1)


LONG = "L" * (NAME_MAX - len(".arrow"))
CASES: dict[str, tuple[bytes, str, Maker]] = {
    "long-name-at-the-limit": (f"{LONG}.arrow".encode(), "ok", _valid(["long-1", "long-2"])),
    "long-name-one-below": (f"{LONG[1:]}.arrow".encode(), "ok", _valid(["long-3"])),
    "long-name-garbage": (f"{LONG}.arrow".encode(), "unreadable_file", _garbage),
    "long-multibyte-name": (
        ("é" * 124 + "x.arrow").encode(),
        "ok",
        _valid(["multibyte-1"]),
    ),
    "odd-bytes-name": (b"-\xff\xfe odd\nname .arrow", "ok", _valid(["odd-1"])),
    "leading-dash-name": (b"--rf.arrow", "ok", _valid(["dash-1"])),
    "symlink-to-valid-file-outside": (b"link-out.arrow", "symlink", _link_out),
    "dangling-symlink": (b"dangling.arrow", "symlink", _dangling),
    "symlink-to-directory": (b"link-dir.arrow", "symlink", _link_to_dir),
    "symlink-loop": (b"loop.arrow", "symlink", _link_loop),
    "directory": (b"dir.arrow", "not_a_regular_file", _directory),
    "fifo": (b"fifo.arrow", "not_a_regular_file", _fifo),
    "socket": (b"socket.arrow", "not_a_regular_file", _socket),
    "hard-link-to-file-outside": (b"hard.arrow", "hard_link", _hard_link_out),
    "oversized-file": (b"huge.arrow", "file_too_large", _oversized),
}


def quarantined(data: Path) -> dict[str, tuple[Path, dict[str, object]]]:
    """Sidecars under quarantine/files/, by directory name: (the copy, the sidecar)."""
    out = {}
    root = data / "quarantine" / "files"
    for d in sorted(root.iterdir()) if root.exists() else []:
        sidecar = json.loads((d / "reason.json").read_text())
        (copy,) = [p for p in d.iterdir() if p.name != "reason.json"]
        out[d.name] = (copy, sidecar)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_each_poison_entry_is_quarantined_once_and_the_consumer_moves_on(
    tmp_path: Path, case: str
) -> None:
    raw_name, status, make = CASES[case]
    data, outside = tmp_path / "data", tmp_path / "outside"
    incoming = data / "incoming"
    incoming.mkdir(parents=True)
    outside.mkdir()
    outside_before = sorted(p.name for p in outside.iterdir())
    consumer = ConsumerProcess(base_env(data), tmp_path / "consumer.log").start()
    try:
        # Good files on either side of it in name order: the one after must land too.
        write(incoming / "0-good-before.arrow", arrow_bytes(["good-1"]))
        entry = incoming / os.fsdecode(raw_name)
        make(entry, outside)
        write(incoming / "~good-after.arrow", arrow_bytes(["good-2"]))
        wait_for(
            lambda: (drained(data) and len(ledger(data)) == 3) or not consumer.running(),
            "every entry to be landed or quarantined",
        )
        assert consumer.running(), consumer.text()
        rows = ledger(data)
        shown = display_name(os.fsdecode(raw_name))
        (row,) = rows.filter(pl.col("source_file") == shown).iter_rows(named=True)
        assert row["status"] == status
        ids = set(lake_table(data, "events")["event_id"])
        assert {"good-1", "good-2"} <= ids
        assert not any(i.startswith(("outside", "in-a-dir")) for i in ids)  # never followed
        found = quarantined(data)
        if status == "ok":
            assert not found
        else:
            (copy, sidecar) = found[row["batch_id"]]
            assert os.fsencode(copy.name) == raw_name  # the exact name, on the copy
            assert sidecar["reason"] == status and sidecar["file"] == shown
            assert consumer.text().count("quarantined ") == 1  # logged once
        # The outside world is untouched: links were moved, not followed.
        assert sorted(p.name for p in outside.iterdir()) == outside_before or case in (
            "symlink-to-valid-file-outside",
            "symlink-to-directory",
            "hard-link-to-file-outside",
        )
        for p in outside.iterdir():
            assert p.exists()
        assert consumer.running()
        assert consumer.terminate() == 0, consumer.text()
        assert "Traceback" not in consumer.text(), consumer.text()
    finally:
        consumer.kill()


def test_quarantined_copies_of_one_name_never_overwrite_each_other(tmp_path: Path) -> None:
    """Before: the second bad file's copy replaced the first one's. Now: both stay."""
    data = tmp_path / "data"
    incoming = data / "incoming"
    incoming.mkdir(parents=True)
    consumer = ConsumerProcess(base_env(data), tmp_path / "consumer.log").start()
    try:
        for n, content in enumerate([b"first bad content", b"second, different bad content"]):
            write(incoming / "same-name.arrow", content)
            # Drained too: the file is set aside after its ledger row is committed (a loaded
            # machine showed the ledger row before the second copy had moved).
            wait_for(
                lambda n=n: drained(data) and len(ledger(data)) == n + 1,
                "the bad file to be quarantined",
            )
        found = quarantined(data)
        assert sorted(copy.read_bytes() for copy, _ in found.values()) == [
            b"first bad content",
            b"second, different bad content",
        ]
        assert all(sidecar["file"] == "same-name.arrow" for _, sidecar in found.values())
        assert len({sidecar["batch_id"] for _, sidecar in found.values()}) == 2
        assert consumer.terminate() == 0, consumer.text()
    finally:
        consumer.kill()


def test_an_unreadable_file_is_quarantined_as_permission_denied(tmp_path: Path) -> None:
    """A consumer without the right to read one file meets it: quarantined, the rest lands.

    Root reads every file (CAP_DAC_OVERRIDE), so the consumer runs as root with the two
    capabilities that bypass file permissions dropped from its bounding set: the interpreter
    under /root stays readable, and a mode-000 file is not.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to drop the capabilities that bypass permissions) and setpriv")
    no_override = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-dac_override,-dac_read_search",
        sys.executable,
    ]
    data = tmp_path / "data"
    (data / "incoming").mkdir(parents=True)
    write(data / "incoming" / "0-good.arrow", arrow_bytes(["readable"]))
    secret = data / "incoming" / "1-secret.arrow"
    write(secret, arrow_bytes(["secret"]))
    os.chmod(secret, 0o000)
    proc = subprocess.run(
        [*no_override, "-m", "cli", "consume", "--once"],
        env=base_env(data),
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    statuses = dict(ledger(data).select("source_file", "status").iter_rows())
    assert statuses == {"0-good.arrow": "ok", "1-secret.arrow": "permission_denied"}
    assert not (data / "incoming" / "1-secret.arrow").exists()


# -- property: names and entry kinds, in-process -------------------------------------------------
KINDS: dict[str, tuple[str, Maker]] = {
    "valid": ("ok", _valid(["x"])),  # ids are replaced per entry below
    "garbage": ("unreadable_file", _garbage),
    "symlink-out": ("symlink", _link_out),
    "dangling": ("symlink", _dangling),
    "link-to-dir": ("symlink", _link_to_dir),
    "directory": ("not_a_regular_file", _directory),
    "fifo": ("not_a_regular_file", _fifo),
    "hard-link": ("hard_link", _hard_link_out),
}
#: Names of 1..NAME_MAX bytes ending in .arrow: any byte but '/' and NUL.
names = st.binary(min_size=1, max_size=NAME_MAX - len(".arrow")).map(
    lambda b: b.replace(b"/", b"_").replace(b"\0", b"\n") + b".arrow"
)
entries = st.lists(
    st.tuples(names, st.sampled_from(sorted(KINDS))),
    min_size=1,
    max_size=4,
    unique_by=lambda e: e[0],
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=entries)
def test_any_name_and_entry_kind_is_landed_or_quarantined(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[bytes, str]]
) -> None:
    root = tmp_path_factory.mktemp("prop")
    data, outside = root / "data", root / "outside"
    (data / "incoming").mkdir(parents=True)
    expected: dict[str, tuple[str, str]] = {}
    for n, (raw, kind) in enumerate(entries):
        status, make = KINDS[kind]
        where = outside / str(n)
        where.mkdir(parents=True)
        path = data / "incoming" / os.fsdecode(raw)
        if kind == "valid":
            write(path, arrow_bytes([f"id-{n}"]))
        else:
            make(path, where)
        expected[display_name(os.fsdecode(raw))] = (status, f"id-{n}")
    s = Settings.from_env(
        {}, data_dir=str(data), fsync=False, max_events_per_second=0, disk_min_free=0
    )
    consume_once(s)
    assert drained(data)
    rows = dict(ledger(data).select("source_file", "status").iter_rows())
    assert rows == {name: status for name, (status, _) in expected.items()}
    stored = lake_table(data, "events")
    landed = set(stored["event_id"]) if len(stored) else set()
    assert landed == {i for status, i in expected.values() if status == "ok"}
    for _dirpath, dirnames, filenames in os.walk(data):
        for name in [*dirnames, *filenames]:
            assert len(os.fsencode(name)) <= NAME_MAX
    for raw, _ in entries:
        assert len(internal_stem(os.fsdecode(raw))) <= 100


def test_an_entry_that_cannot_be_moved_is_recorded_and_passed_over(tmp_path: Path) -> None:
    """A mount point under a *.arrow name cannot be renamed (EBUSY): ledger row, one log line,
    and the consumer goes on with the files after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    data = tmp_path / "data"
    incoming = data / "incoming"
    mount = incoming / "mounted.arrow"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    consumer = ConsumerProcess(base_env(data), tmp_path / "consumer.log").start()
    try:
        write(incoming / "~after.arrow", arrow_bytes(["after-1"]))
        wait_for(
            lambda: len(ledger(data)) == 2 or not consumer.running(), "both entries in the ledger"
        )
        statuses = dict(ledger(data).select("source_file", "status").iter_rows())
        assert statuses == {"mounted.arrow": "not_a_regular_file", "~after.arrow": "ok"}
        assert consumer.running()
        assert consumer.terminate() == 0, consumer.text()
        assert consumer.text().count("cannot move") == 1, consumer.text()
    finally:
        consumer.kill()
        subprocess.run(["umount", "-l", str(mount)], check=False)
