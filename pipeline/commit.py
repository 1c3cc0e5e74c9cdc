"""Atomic, idempotent batch commits: stage every output, flip one directory name, then publish.

A batch writes all its files under ``staging/<batch_id>.partial/``, mirroring their final
paths, plus ``manifest.json``. Renaming the directory to ``<batch_id>.committed`` is the commit
point. Publishing renames each file into place (events/, quarantine/, ledger/), so a reader of
the lake sees a batch's files appear whole, and never a half-written one. After a crash,
``*.partial`` is discarded (the batch is redone from its input file) and ``*.committed`` is
published again (renames are idempotent), so every batch lands exactly once.

Several consumers may attempt one batch (a takeover after a lost lease): each attempt stages
under its own ``<batch_id>.<attempt>.partial``; only one rename to ``<batch_id>.committed`` can
succeed (the target then exists and is not empty), and a takeover deletes the partial
directories of earlier attempts first, which fences a stalled consumer out of committing.
A fence renames the directory away before deleting it: a stalled attempt renaming the same
directory to ``.committed`` at that moment either wins (its batch stays whole) or cannot commit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline import faults
from pipeline.schema import PARQUET_COMPRESSION
from pipeline.spool import fsync

PARTIAL = ".partial"
COMMITTED = ".committed"
MANIFEST = "manifest.json"


class CommitConflictError(RuntimeError):
    """This attempt may not commit: another attempt committed the batch or fenced this one."""


@dataclass
class StagedBatch:
    """The outputs of one batch, written under staging/ until committed."""

    root: Path
    batch_id: str
    durable: bool = True
    attempt: str = "local"
    files: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def partial_dir(self) -> Path:
        return self.root / "staging" / f"{self.batch_id}.{self.attempt}{PARTIAL}"

    @property
    def committed_dir(self) -> Path:
        return self.root / "staging" / f"{self.batch_id}{COMMITTED}"

    def abandon(self) -> None:
        """Remove what this attempt staged (a write failed): nothing partial stays behind."""
        shutil.rmtree(self.partial_dir, ignore_errors=True)

    def begin(self) -> StagedBatch:
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.partial_dir.mkdir(parents=True)
        return self

    def write_parquet(self, relpath: str, frame: pl.DataFrame, *, row_group_size: int) -> None:
        """Stage ``frame`` to be published at DATA_DIR/``relpath``."""
        path = self.partial_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(
            path, compression=PARQUET_COMPRESSION, statistics=True, row_group_size=row_group_size
        )
        if self.durable:
            fsync(path)
        self.files.append(relpath)

    def commit(self) -> None:
        """The commit point: after this returns, the batch will be published even after a crash."""
        manifest = {"batch_id": self.batch_id, "files": self.files, **self.extra}
        mpath = self.partial_dir / MANIFEST
        try:
            mpath.write_text(json.dumps(manifest))
            if self.durable:
                fsync(mpath)
                for d in {(self.partial_dir / f).parent for f in self.files} | {self.partial_dir}:
                    fsync(d)
            os.replace(self.partial_dir, self.committed_dir)
        except FileNotFoundError:
            raise CommitConflictError(
                f"batch {self.batch_id}: this attempt was fenced off by a takeover"
            ) from None
        except OSError as exc:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # e.g. ENOSPC writing the manifest: a fault to wait out, not a conflict
            raise CommitConflictError(
                f"batch {self.batch_id} was committed by another attempt: {exc}"
            ) from None
        if self.durable:
            fsync(self.committed_dir.parent)


def publish(root: Path, committed_dir: Path, *, durable: bool = True) -> dict[str, object]:
    """Move a committed batch's files into place (idempotent); return its manifest."""
    manifest: dict[str, object] = json.loads((committed_dir / MANIFEST).read_text())
    files = manifest["files"]
    assert isinstance(files, list)
    touched: set[Path] = set()
    for rel in files:
        src, dst = committed_dir / rel, root / rel
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, dst)
            except FileNotFoundError:  # another consumer finishing this batch moved it first
                continue
            touched.add(dst.parent)
            faults.point("mid_publish")
    if durable:
        for d in touched:
            fsync(d)
    return manifest


def finish(committed_dir: Path) -> None:
    """Forget a published batch's staging directory.

    Renamed away first: a crash in the middle of deleting it in place would leave a
    ``.committed`` directory without its manifest, which recovery could not finish. The new
    name reads as a discarded attempt of the batch, so recovery removes what a crash leaves.
    """
    batch_id = committed_dir.name[: -len(COMMITTED)]
    done = committed_dir.with_name(f"{batch_id}.finished-{uuid.uuid4().hex[:8]}{PARTIAL}")
    try:
        os.rename(committed_dir, done)
    except FileNotFoundError:  # another consumer finished it
        return
    shutil.rmtree(done, ignore_errors=True)


def _fence(staging_dir: Path) -> None:
    """Take a staging directory away atomically, then delete it.

    A plain rmtree racing an attempt's own rename to ``.committed`` could delete half of a
    batch that had just committed. The new name still ends in ``.partial`` and names the same
    batch, so a crash in the middle leaves something ``pending`` that recovery removes.
    """
    name = staging_dir.name
    attempt = (
        name[: -len(PARTIAL)] if name.endswith(PARTIAL) else f"{batch_id_of(staging_dir)}.gone"
    )
    fenced = staging_dir.with_name(f"{attempt}~{uuid.uuid4().hex[:8]}{PARTIAL}")
    try:
        os.rename(staging_dir, fenced)
    except FileNotFoundError:  # it committed, or someone else fenced it
        return
    shutil.rmtree(fenced, ignore_errors=True)


def discard_partials(root: Path, batch_id: str) -> None:
    """Delete every uncommitted attempt of a batch (the fence of a takeover)."""
    staging = root / "staging"
    if staging.exists():
        for name in os.listdir(staging):
            if name.startswith(f"{batch_id}.") and name.endswith(PARTIAL):
                _fence(staging / name)


def fence_uncommitted(root: Path) -> list[tuple[Path, Path]]:
    """Fence off every uncommitted attempt of every batch; list what is committed but unpublished.

    For a key cache that lost its claims: an attempt that has not committed now never will, and
    the events files of committed batches still being published are returned as (staged path,
    published path) pairs — read the staged one, or the published one if it moved meanwhile —
    so that together with events/ (read afterwards) nothing committed is missed.
    """
    committed, partial = pending(root)
    for d in partial:
        _fence(d)
    out = []
    for d in committed:
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except FileNotFoundError:  # finished meanwhile: everything is in events/
            continue
        out += [(d / f, root / f) for f in manifest["files"] if f.startswith("events/")]
    return out


def committed_dir_of(root: Path, batch_id: str) -> Path:
    return root / "staging" / f"{batch_id}{COMMITTED}"


def batch_id_of(staging_dir: Path) -> str:
    """The batch a staging directory belongs to."""
    name = staging_dir.name
    if name.endswith(COMMITTED):
        return name[: -len(COMMITTED)]
    return name[: -len(PARTIAL)].rsplit(".", 1)[0]


def pending(root: Path) -> tuple[list[Path], list[Path]]:
    """(committed-but-unpublished, partial) staging directories, in name order."""
    staging = root / "staging"
    if not staging.exists():
        return [], []
    names = sorted(os.listdir(staging))
    committed = []
    for n in names:
        if not n.endswith(COMMITTED):
            continue
        if (staging / n / MANIFEST).exists():
            committed.append(staging / n)
        else:
            # What finish() deleting in place (before it renamed first) left when killed: the
            # batch was published completely, so nothing is left to do but to remove it.
            _fence(staging / n)
    partial = [staging / n for n in names if n.endswith(PARTIAL)]
    return committed, partial
