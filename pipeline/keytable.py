"""Event-id fingerprints held by generation, in the compiled table the Redis module also uses.

One table per generation (``Keys.slice``: a span of event time, a window long by default):
segments of open addressing, 10.7 to 16 bytes a key (``redis_module/keytable.h``), built with
the package (``pipeline/_keytable.c``) and called through ctypes, a whole batch per call and
without the GIL. A key is found whatever generation holds it, so a copy that carries another
event_time (a re-stamping SDK, a pixel stamped on receipt) is still a duplicate; generations
only say when keys may be dropped (:meth:`KeySet.drop_below`), a whole table at a time.

A table tells keys apart by ``lo`` (64 bits) and the top ``SEGMENT_BITS`` of ``hi``: 76 bits.
Two distinct event_ids then collide with probability 2**-76 per pair: with 100M keys held,
one false duplicate in about 7.6e14 events.

Replaced sorted NumPy runs (docs/decisions/0010-compiled-key-table.md): at 10M keys held, a
claim cost 369 ns a key against 59, and 16 bytes a key against 11.2.
"""

from __future__ import annotations

import ctypes
import importlib.util
import secrets
from collections.abc import Iterator
from typing import Final

import numpy as np
import numpy.typing as npt

from pipeline.fingerprint import Keys

Mask = npt.NDArray[np.bool_]
#: Segments a generation's table has: 4,096 headers of 16 bytes, each segment a few hundred
#: to a few hundred thousand keys (10M to 1G a generation), each grown on its own.
SEGMENT_BITS: Final = 12
#: Segments one snapshot piece copies (:meth:`KeySet.pieces`): a few MB at 10M keys.
PIECE_SEGMENTS: Final = 256

_P = ctypes.c_void_p


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("pipeline._keytable")
    if spec is None or spec.origin is None:
        raise ImportError(
            "pipeline._keytable is not built: install adevents with pip (it compiles "
            "pipeline/_keytable.c, which needs a C compiler)"
        )
    lib = ctypes.CDLL(spec.origin)
    lib.kt_new.restype = _P
    lib.kt_new.argtypes = [ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64]
    lib.kt_free.restype = None
    lib.kt_free.argtypes = [_P]
    for name in ("kt_keys", "kt_bytes", "kt_displacement"):
        getattr(lib, name).restype = ctypes.c_uint64
        getattr(lib, name).argtypes = [_P]
    lib.kt_claim.restype = ctypes.c_int64
    lib.kt_claim.argtypes = [_P, ctypes.c_int, _P, _P, ctypes.c_size_t, ctypes.c_int, _P]
    lib.kt_count.restype = ctypes.c_uint64
    lib.kt_count.argtypes = [_P, ctypes.c_uint32, ctypes.c_uint32]
    lib.kt_first_copies.restype = ctypes.c_int64
    lib.kt_first_copies.argtypes = [_P, _P, ctypes.c_size_t, ctypes.c_uint64, _P]
    lib.kt_dump.restype = None
    lib.kt_dump.argtypes = [_P, ctypes.c_uint32, ctypes.c_uint32, _P, _P]
    return lib


_LIB: Final = _load()
#: Places rows in first_copies' table (see kt_first_copies): odd, secret, new every process.
_SALT: Final = secrets.randbits(64) | 1


class _Table:
    """One generation's table; its memory is freed with the object (so a snapshot still
    reading a dropped generation keeps it alive). Keys are placed by two salts, secret and new
    for each table (``salts`` only for tests: (0, 1) places them unkeyed), so event_ids crafted
    against the public fingerprint cannot pile into one probe run (``keytable.h``)."""

    __slots__ = ("ptr",)

    def __init__(self, salts: tuple[int, int] | None = None) -> None:
        salt_add, salt_mul = salts or (secrets.randbits(64), secrets.randbits(64))
        self.ptr: int = _LIB.kt_new(SEGMENT_BITS, salt_add, salt_mul)

    def __del__(self) -> None:
        _LIB.kt_free(self.ptr)

    def keys(self) -> int:
        return int(_LIB.kt_keys(self.ptr))

    def bytes(self) -> int:
        return int(_LIB.kt_bytes(self.ptr))

    def displacement(self) -> int:
        """Slots past their home summed over the keys: ~keys / 2 unless keys pile up."""
        return int(_LIB.kt_displacement(self.ptr))

    def dump(self, first: int, count: int) -> tuple[npt.NDArray[np.uint64], ...]:
        n = int(_LIB.kt_count(self.ptr, first, count))
        hi, lo = np.empty(n, np.uint64), np.empty(n, np.uint64)
        _LIB.kt_dump(self.ptr, first, count, hi.ctypes.data, lo.ctypes.data)
        return hi, lo


def _claim(
    tables: list[_Table], hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], *, add: bool
) -> npt.NDArray[np.uint8]:
    """Per key, 0 when no table holds it (then added to ``tables[0]`` if ``add``), else 1 + the
    index of the first that does (255 for any past the 254th: a byte)."""
    hi, lo = np.ascontiguousarray(hi, np.uint64), np.ascontiguousarray(lo, np.uint64)
    out = np.zeros(len(lo), np.uint8)
    if len(lo) and tables:
        ptrs = (_P * len(tables))(*(t.ptr for t in tables))
        added = _LIB.kt_claim(
            ptrs, len(tables), hi.ctypes.data, lo.ctypes.data, len(lo), add, out.ctypes.data
        )
        if added < 0:
            raise MemoryError(f"no memory to claim {len(lo):,} keys in {len(tables)} tables")
    return out


def first_copies(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> Mask:
    """Per key, whether it is the first row holding its fingerprint (both halves compared):
    one pass in C over a table of row numbers, without the GIL."""
    return _first_copies(hi, lo)[0]


def _first_copies(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> tuple[Mask, int]:
    """:func:`first_copies`, and the probes its table took past each row's first slot."""
    hi, lo = np.ascontiguousarray(hi, np.uint64), np.ascontiguousarray(lo, np.uint64)
    out = np.empty(len(lo), np.uint8)
    probes = _LIB.kt_first_copies(hi.ctypes.data, lo.ctypes.data, len(lo), _SALT, out.ctypes.data)
    if probes < 0:
        raise MemoryError(f"no memory for the first copies of {len(lo):,} keys")
    return out.view(np.bool_), int(probes)


class KeySet:
    """Fingerprints by generation, with membership over every generation held.

    Not thread-safe: callers serialise every call (the embedded key cache holds its lock,
    and advances :meth:`pieces` under it too).
    """

    def __init__(self, keys: Keys | None = None) -> None:
        self.tables: dict[int, _Table] = {}
        if keys is not None:
            self.add(keys)

    @staticmethod
    def _generations(keys: Keys) -> Iterator[tuple[int, slice | npt.NDArray[np.intp]]]:
        """Each generation in ``keys`` and where its keys are."""
        if not len(keys):
            return
        first, last = int(keys.slice.min()), int(keys.slice.max())
        if first == last:  # the usual batch: one generation, no grouping pass
            yield first, slice(None)
            return
        for generation in np.unique(keys.slice).tolist():
            yield generation, np.flatnonzero(keys.slice == generation)

    def add(self, keys: Keys) -> None:
        """Hold ``keys``, each in its own generation."""
        for generation, at in self._generations(keys):
            self.hold(generation, keys.hi[at], keys.lo[at])

    def hold(self, generation: int, hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> None:
        """Hold these keys in ``generation`` (a key another generation holds too is held twice:
        harmless, and it goes when the older generation does)."""
        _claim([self.tables.setdefault(generation, _Table())], hi, lo, add=True)

    def contains(self, keys: Keys) -> Mask:
        """Per key, whether any generation holds it."""
        found: Mask = _claim(list(self.tables.values()), keys.hi, keys.lo, add=False) != 0
        return found

    def add_new(self, keys: Keys) -> Mask:
        """Add the keys no generation holds yet to their own generations; per key, whether it
        was new. A key repeated in ``keys`` is new once: in its earliest generation (the
        consumer claims distinct keys, a group's first copies)."""
        new = np.zeros(len(keys), dtype=bool)
        for generation, at in self._generations(keys):
            own = self.tables.setdefault(generation, _Table())
            others = [t for g, t in self.tables.items() if g != generation]
            new[at] = _claim([own, *others], keys.hi[at], keys.lo[at], add=True) == 0
        return new

    def drop_below(self, cutoff: int) -> None:
        for generation in [g for g in self.tables if g < cutoff]:
            del self.tables[generation]

    def pieces(self) -> Iterator[tuple[int, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]:
        """Every key held as (generation, hi, lo) pieces of ``PIECE_SEGMENTS`` segments, copied
        one piece per step, so a caller can release its lock between steps (a snapshot of a
        large window then neither holds claims up nor copies the window at once). ``hi``
        keeps the bits a table looks at. A key added meanwhile may or may not be in them."""
        for generation, table in list(self.tables.items()):
            for first in range(0, 1 << SEGMENT_BITS, PIECE_SEGMENTS):
                hi, lo = table.dump(first, PIECE_SEGMENTS)
                if len(lo):
                    yield generation, hi, lo

    def size(self) -> int:
        return sum(t.keys() for t in self.tables.values())

    def bytes(self) -> int:
        """Bytes held from the allocator (slots, segment headers, tables)."""
        return sum(t.bytes() for t in self.tables.values())
