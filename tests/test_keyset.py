"""FingerprintSet: exact membership by event_id whatever the event_time, inside the window only,
through merges, sweeps and tag wrap-around; 14 bytes a key."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import keyset
from pipeline.fingerprint import Keys
from pipeline.keyset import KEY_BYTES, FingerprintSet
from pipeline.schema import MAX_FUTURE_MS

WINDOW_MS = 60_000
SLICE_MS = 1_000
TICK_MS = FingerprintSet(WINDOW_MS, SLICE_MS).tick_ms


def random_keys(rng: np.random.Generator, n: int, ms: int | np.ndarray) -> Keys:
    hi = rng.integers(0, 2**64, n, dtype=np.uint64)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64)
    times = np.broadcast_to(np.asarray(ms, np.int64), (n,)).copy()
    return Keys(times // SLICE_MS, hi, lo, times)


def restamped(keys: Keys, shift_ms: int) -> Keys:
    assert keys.ms is not None
    ms = keys.ms + shift_ms
    return Keys(ms // SLICE_MS, keys.hi, keys.lo, ms)


@pytest.fixture(autouse=True)
def small_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges after a few batches, so that a test of a few thousand keys goes through them."""
    monkeypatch.setattr(keyset, "SMALL_RUNS", 2)


def test_membership_is_exact_through_merges() -> None:
    rng = np.random.default_rng(1)
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    added: list[Keys] = []
    for b in range(40):
        batch = random_keys(rng, int(rng.integers(1, 400)), 1_000 + b)
        assert not s.contains(batch).any()
        s.add(batch)
        added.append(batch)
        everything = Keys.concat(added)
        assert s.contains(everything).all()
        assert not s.contains(random_keys(rng, 500, 1_000)).any()
    assert s.size() == len(Keys.concat(added))
    assert s.nbytes() >= KEY_BYTES * s.size()
    assert any(len(p.large) > 0 and len(p.small) <= 2 for p in s._parts)


@pytest.mark.parametrize("shift_ms", [1, 300, 999, 1_000, -300, -1_001, 45_000, -45_000])
def test_a_copy_with_another_event_time_is_held(shift_ms: int) -> None:
    rng = np.random.default_rng(2)
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    original = random_keys(rng, 1_000, 100_999)  # the last millisecond of a second
    s.add(original)
    s.set_watermark(100_999)
    assert s.contains(restamped(original, shift_ms)).all()


def test_keys_age_out_of_the_window_and_ahead_of_it_stay() -> None:
    rng = np.random.default_rng(3)
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    old = random_keys(rng, 300, 1_000_000)
    s.add(old)
    s.set_watermark(1_000_000 + WINDOW_MS - TICK_MS)  # one tick inside the window
    assert s.contains(old).all()
    s.set_watermark(1_000_000 + WINDOW_MS + 3 * TICK_MS)
    assert not s.contains(old).any()


def test_a_key_far_ahead_of_the_last_commit_is_held() -> None:
    """A consumer catching up a backlog commits old events while a new one, up to MAX_FUTURE_MS
    ahead of the clock, comes in: its key is held, and moves the window along with it."""
    rng = np.random.default_rng(6)
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    s.set_watermark(1_000_000)
    recent = random_keys(rng, 100, 1_000_000 - WINDOW_MS // 2)
    s.add(recent)
    far = random_keys(rng, 100, 1_000_000 + 20 * WINDOW_MS + MAX_FUTURE_MS)
    s.add(far)
    assert s.contains(far).all()
    assert not s.contains(recent).any()  # late now: the watermark moved with the far key


@pytest.mark.parametrize("window_ms", [10_000, WINDOW_MS, 3_600_000])
def test_expired_keys_never_come_back_when_tags_wrap(window_ms: int) -> None:
    """Tags count ticks modulo 2**16: a sweep drops expired keys before their age wraps around
    to look live again, whether the watermark creeps or jumps."""
    rng = np.random.default_rng(4)
    for step_windows in (0.25, 3.9, 8.0, 8.5, 17.0):
        s = FingerprintSet(window_ms, SLICE_MS)
        t = 10_000_000
        first = random_keys(rng, 200, t)
        s.add(first)
        s.set_watermark(t)
        for _ in range(int(40 / step_windows) + 1):
            t += int(step_windows * window_ms)
            s.set_watermark(t)
            s.add(random_keys(rng, 50, t))
            inside = t - 10_000_000 <= window_ms
            assert s.contains(first).all() if inside else not s.contains(first).any(), t
        assert s.size() <= 50 * (1 + int(2 * SWEEP_LIMIT / step_windows) + 1)


SWEEP_LIMIT = keyset.SWEEP_WINDOWS + 2


def test_keys_sharing_hi_are_told_apart_by_lo() -> None:
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    hi = np.full(6, 0x1234_5678_9ABC_DEF0, np.uint64)
    lo = (np.arange(6, dtype=np.uint64) + np.uint64(1)) << np.uint64(32)
    ms = np.full(6, 5_000, np.int64)
    keys = Keys(ms // SLICE_MS, hi, lo, ms)
    s.add(keys.take(np.array([0, 2, 4])))
    assert s.contains(keys).tolist() == [True, False, True, False, True, False]


def test_runs_round_trip() -> None:
    rng = np.random.default_rng(5)
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    keys = random_keys(rng, 3_000, rng.integers(0, 50_000, 3_000))
    for part in np.array_split(np.arange(3_000), 7):
        s.add(keys.take(part))
    s.set_watermark(50_000)
    copy = FingerprintSet(WINDOW_MS, SLICE_MS)
    copy.set_watermark(50_000)  # first, as a cache reading its files back does
    copy.add_runs(s.runs())
    assert copy.contains(keys).all() and copy.size() == 3_000


def test_at_most_16_bytes_a_key_once_the_window_is_full() -> None:
    """Runs take 14 bytes a key and the Bloom filters about one more, once generations are
    sized like the ones before them."""
    rng = np.random.default_rng(7)
    s = FingerprintSet(WINDOW_MS, SLICE_MS)
    per_second = 20_000
    for second in range(3 * WINDOW_MS // 1000):
        s.add(random_keys(rng, per_second, 1_000_000 + second * 1000))
    assert s.size() <= per_second * (1.5 * WINDOW_MS // 1000 + 2)  # swept each half window
    assert s.nbytes() / s.size() <= 16
