"""Event-id fingerprints: 128 bits per key, grouped by event-time slice, computed vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl

# Two independent 64-bit hashes of the event_id. Polars documents its hash as stable within a
# version only, so every key cache stores FINGERPRINT_CHECK and rebuilds itself from the events
# table when a different Polars computes different fingerprints.
_SEED_HI = 0x9E3779B97F4A7C15
_SEED_LO = 0xC2B2AE3D27D4EB4F
_CHECK_IDS = ("adevents-fingerprint-check", "", "x" * 128)

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class Keys:
    """Fingerprints of a set of events: slice number, then two 64-bit halves, aligned by row."""

    slice: I64
    hi: U64
    lo: U64
    #: event_time in epoch ms when known (used to size new slices), else None.
    ms: I64 | None = None

    def __len__(self) -> int:
        return len(self.lo)

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Keys:
        ms = None if self.ms is None else self.ms[index]
        return Keys(self.slice[index], self.hi[index], self.lo[index], ms)

    @staticmethod
    def concat(parts: list[Keys]) -> Keys:
        if not parts:
            return empty_keys()
        ms = None if any(p.ms is None for p in parts) else np.concatenate([p.ms for p in parts])
        return Keys(
            np.concatenate([p.slice for p in parts]),
            np.concatenate([p.hi for p in parts]),
            np.concatenate([p.lo for p in parts]),
            ms,
        )


def empty_keys() -> Keys:
    return Keys(np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, np.uint64))


def compute_keys(event_id: pl.Series, event_time: pl.Series, slice_ms: int) -> Keys:
    """Fingerprint each event_id and place it in the slice of its event_time."""
    hi = event_id.hash(_SEED_HI).to_numpy()
    lo = event_id.hash(_SEED_LO).to_numpy()
    millis = event_time.dt.epoch("ms").to_numpy()
    return Keys(np.floor_divide(millis, slice_ms).astype(np.int64), hi, lo, millis)


def fingerprint_check() -> str:
    """A short string that changes whenever the fingerprint function does."""
    s = pl.Series(_CHECK_IDS, dtype=pl.String)
    return "-".join(f"{h:016x}" for h in s.hash(_SEED_HI).to_list() + s.hash(_SEED_LO).to_list())
