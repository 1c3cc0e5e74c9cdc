"""The consumer's place in DATA_DIR: file locks that keep two consumers off one slot."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class ConsumerLockedError(RuntimeError):
    """Another consumer already holds this DATA_DIR (or this slot of it)."""


class ConsumerLock:
    """``state/consumer.lock``, held by every consumer of DATA_DIR: exclusively with the embedded
    key cache (it lives in one process, and a Redis consumer beside it could not see its
    claims), shared with Redis, where each also holds its slot's lock exclusively. The locks
    go with the process, so a consumer killed with -9 frees its place at once."""

    def __init__(self, state: Path, root: Path, slot: int, *, shared: bool) -> None:
        self.state = state
        self.root = root
        self.slot = slot
        self.shared = shared
        self._files: list[IO[str]] = []

    def acquire(self, holder: str) -> None:
        """Take this consumer's place, naming it ``holder``, or raise ConsumerLockedError."""
        whole = self._flock("consumer.lock", exclusive=not self.shared)
        if whole is None:
            raise self._locked("consumer.lock", slot=False)
        self._files = [whole]
        if self.shared:
            slot = self._flock(f"consumer-slot-{self.slot}.lock", exclusive=True)
            if slot is None:
                raise self._locked(f"consumer-slot-{self.slot}.lock", slot=True)
            self._files.append(slot)
        for fh in self._files[-1:]:  # the lock this process holds alone names it
            fh.seek(0)
            fh.truncate()
            fh.write(f"{holder} pid={os.getpid()}\n")
            fh.flush()

    def release(self) -> None:
        for fh in self._files:
            fh.close()
        self._files = []

    def _flock(self, name: str, *, exclusive: bool) -> IO[str] | None:
        fh = open(self.state / name, "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def _locked(self, name: str, *, slot: bool) -> ConsumerLockedError:
        self.release()
        try:
            holder = (self.state / name).read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        if slot:
            where, hint = f"slot {self.slot} of ", ", or give this one another CONSUMER_SLOT."
        else:
            where, hint = "", " (a consumer with the embedded key cache needs DATA_DIR alone)."
        return ConsumerLockedError(
            f"another consumer ({holder}) is already running on {where}{self.root}; "
            f"two consumers there would write duplicates. Stop it first{hint}"
        )
