"""A consumer's spool slot and its commit groups: which files it owns, and what it promised.

Several consumers may share one machine's spool, each with its own static slot
(``CONSUMER_SLOT``). A consumer owns a file once it has renamed it from ``incoming/`` into
``incoming/.slot-<n>/`` (atomic on one filesystem: exactly one slot wins a file), and keeps
owning it across restarts until the file is retired. No lease, no clock.

A commit group is a run of owned files landed by one Delta commit per table, with the
application transaction ``(app_id, version)``. Before any key is claimed for a group, its
:class:`Intent` (the files, the clock reading and the watermark its decisions use) is written
and fsynced under ``state/groups/slot-<n>/<version>.json``. After the events commit, the
decided ledger rows join it (``<version>.decided.json``). Both go when the group's inputs are
retired. A restart redoes every intent left, in version order, with its recorded inputs, so
that a redo decides exactly as the first attempt did, and tables that already hold the version
skip it (see docs/decisions/0002-spool-commit-groups.md).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from pipeline.schema import LedgerRow
from pipeline.spool import atomic_write_bytes, fsync, list_incoming, remove_quietly

#: Prefix of slot directories inside incoming/ (a leading dot: producers' listings skip it).
SLOT_PREFIX: Final = ".slot-"
_DECIDED: Final = ".decided.json"


def spool_id(state: Path) -> str:
    """This spool's lasting identity (a UUID made once in ``state/spool_id``)."""
    path = state / "spool_id"
    if not path.exists():
        # Written aside, then linked into place: of two slots starting at once, one id wins.
        tmp = path.with_name(f".spool_id.{os.getpid()}.tmp")
        atomic_write_bytes(tmp, uuid.uuid4().hex.encode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            remove_quietly(tmp)
        fsync(state)
    return path.read_text().strip()


def app_id_for(spool: str, slot: int) -> str:
    """The Delta application id of one slot of one spool: ``spool:<spool_id>/<slot>``."""
    return f"spool:{spool}/{slot}"


def slot_dir(incoming: Path, slot: int) -> Path:
    return incoming / f"{SLOT_PREFIX}{slot}"


def waiting_entries(incoming: Path) -> list[Path]:
    """Every spool entry not landed yet: unclaimed ones and those every slot holds."""
    entries = list_incoming(incoming)
    try:
        slots = [e.path for e in os.scandir(incoming) if e.name.startswith(SLOT_PREFIX)]
    except FileNotFoundError:
        return entries
    for d in sorted(slots):
        entries += list_incoming(Path(d))
    return entries


@dataclass(frozen=True)
class GroupFile:
    """One batch of a group, by its source position: today a file's name in the slot directory
    (its rows are positions ``(file, row)``); with Kafka, a partition's offset range. The
    batch id tells this batch from a later one at the same position (a file name reused)."""

    name: str
    batch_id: str
    #: An entry no slot can own (it cannot be renamed: a mount point), decided in incoming/.
    in_place: bool = False


@dataclass(frozen=True)
class Intent:
    """What a group's decisions depend on besides its files' bytes and the key cache."""

    version: int
    files: list[GroupFile]
    now_ms: int
    watermark_ms: int | None
    #: The decided ledger rows (one per file), once the events commit may have happened.
    ledger: list[LedgerRow] | None = field(default=None)

    def to_json(self) -> bytes:
        body = asdict(self)
        body.pop("ledger")
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, raw: bytes, ledger: list[LedgerRow] | None) -> Intent:
        body = json.loads(raw)
        files = [GroupFile(**f) for f in body.pop("files")]
        return cls(files=files, ledger=ledger, **body)


class Slot:
    """One consumer's slot of the spool: the files it owns."""

    def __init__(self, incoming: Path, slot: int, *, durable: bool) -> None:
        self.number = slot
        self.incoming = incoming
        self.dir = slot_dir(incoming, slot)
        self.durable = durable
        self.dir.mkdir(parents=True, exist_ok=True)

    def owned(self) -> list[Path]:
        """Files this slot owns, in name order."""
        return list_incoming(self.dir)

    def claim(self, path: Path) -> Path | None:
        """Take ``path`` from incoming/ into this slot; None if another slot took it first.

        An entry that cannot be renamed (a mount point: EBUSY; EXDEV) raises OSError.
        """
        target = self.dir / path.name
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target

    def sync(self) -> None:
        """Make claims durable: a claimed file stays this slot's after a crash."""
        if self.durable:
            fsync(self.dir)
            fsync(self.incoming)


class Intents:
    """The intents of one consumer's unfinished groups, under ``state/groups/slot-<n>/``."""

    def __init__(self, state: Path, slot: int, *, durable: bool) -> None:
        self.dir = state / "groups" / f"slot-{slot}"
        self.durable = durable
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, version: int, suffix: str = ".json") -> Path:
        return self.dir / f"{version:015d}{suffix}"

    def record(self, intent: Intent) -> None:
        """Write the intent durably; decisions may be made (keys claimed) only after this."""
        atomic_write_bytes(self._path(intent.version), intent.to_json(), durable=self.durable)

    def record_decided(self, version: int, ledger: Sequence[LedgerRow]) -> None:
        """Keep the decided ledger rows: a redo after the events commit reuses them."""
        body = json.dumps([asdict(row) for row in ledger]).encode()
        atomic_write_bytes(self._path(version, _DECIDED), body, durable=self.durable)

    def drop_partial_records(self) -> None:
        """Remove records a kill left half-written (their temp files); only the slot's owner,
        when it starts or resumes, may call this."""
        for name in os.listdir(self.dir):
            if name.startswith(".") and name.endswith(".tmp"):
                remove_quietly(self.dir / name)

    def pending(self) -> list[Intent]:
        """Intents of groups not finished, oldest first."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json") or name.endswith(_DECIDED) or name.startswith("."):
                continue
            version = int(name.removesuffix(".json"))
            try:
                raw = json.loads(self._path(version, _DECIDED).read_bytes())
                decided = [LedgerRow(**row) for row in raw]
            except FileNotFoundError:
                decided = None
            out.append(Intent.from_json((self.dir / name).read_bytes(), decided))
        return out

    def forget(self, version: int) -> None:
        """The group is retired: drop its records (the decided rows last, being the larger)."""
        remove_quietly(self._path(version))
        remove_quietly(self._path(version, _DECIDED))
        if self.durable:
            fsync(self.dir)
