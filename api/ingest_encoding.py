"""Compressed ingest bodies (``Content-Encoding: gzip`` or ``zstd``), decompressed in bounded steps.

A compression bomb (a few KB that expand to GBs) is refused after a bounded amount of work: the
output may grow to ``limit(len(body))`` = the smaller of INGEST_MAX_BODY_BYTES and
INGEST_MAX_COMPRESSION_RATIO times the compressed size, and decompression stops as soon as it
passes that, at most :data:`MAX_OVERSHOOT` bytes later. Nothing is ever decompressed whole first.

gzip bodies may hold several members and zstd bodies several frames, one after the other, as
their formats allow; anything after the last one, a truncated member or frame, or a damaged one
is a :class:`CorruptBodyError` (400) whose message says which encoding, never the library's words.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

import zstandard

from pipeline.decode import BodyError

IDENTITY: Final = "identity"
GZIP: Final = "gzip"
ZSTD: Final = "zstd"
ENCODINGS: Final = (GZIP, ZSTD)
#: RFC 9110 asks a recipient to treat ``x-gzip`` as ``gzip``.
_ALIASES: Final = {"x-gzip": GZIP}
#: Sent with a 415 for an unknown encoding, as RFC 9110 (12.5.3) suggests.
ACCEPT_ENCODING: Final = f"{GZIP}, {ZSTD}, {IDENTITY}"

#: Most bytes one gzip step yields (zlib's ``max_length``).
GZIP_STEP: Final = 64 * 1024
#: zstd's largest block (ZSTD_BLOCKSIZE_MAX): the most one block yields.
_ZSTD_BLOCK: Final = 128 * 1024
#: Most output per compressed byte in zstd: an RLE block is 4 bytes (3 of header, 1 repeated)
#: for up to a whole 128 KiB block. A step is fed few enough bytes that, with the block it may
#: complete, it cannot pass the limit by more than MAX_OVERSHOOT.
_ZSTD_PER_BYTE: Final = _ZSTD_BLOCK // 4
#: The fewest compressed bytes a zstd step is fed (so a step near the limit still advances).
_ZSTD_MIN_STEP: Final = 2
#: How far past its limit decompression can get before it stops: one gzip step, or a zstd step
#: (its smallest input's worth plus one block it completes).
MAX_OVERSHOOT: Final = max(GZIP_STEP, _ZSTD_BLOCK + _ZSTD_MIN_STEP * _ZSTD_PER_BYTE)
#: Largest zstd window accepted: every standard level up to 19 fits (19 uses 8 MiB); a larger
#: one (``--long``, ``--ultra``) would make the server allocate that much per request.
ZSTD_MAX_WINDOW: Final = 8 * 1024**2

_GZIP_MAGIC: Final = b"\x1f\x8b"


class UnsupportedEncodingError(ValueError):
    """The Content-Encoding is not one this ingest decodes (415)."""


class CorruptBodyError(BodyError):
    """The compressed body cannot be decompressed: damaged, truncated, not that encoding (400)."""


class InflatedTooLargeError(BodyError):
    """The body decompresses to more than its limit (413); decompression stopped there.

    ``decompressed`` is how many bytes were produced when it stopped (at most the limit plus
    MAX_OVERSHOOT): the work the bomb cost."""

    def __init__(self, message: str, *, decompressed: int) -> None:
        super().__init__(message)
        self.decompressed = decompressed


def content_encoding(header: str | None) -> str:
    """The one coding named by a Content-Encoding header: ``identity``, ``gzip`` or ``zstd``.

    ``identity`` entries are no coding at all; two real codings (a body compressed twice) are
    refused, as is any other name."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    codings = [_ALIASES.get(c, c) for c in codings if c and c != IDENTITY]
    if not codings:
        return IDENTITY
    if len(codings) == 1 and codings[0] in ENCODINGS:
        return codings[0]
    shown = (header or "").strip()
    shown = shown if len(shown) <= 100 else shown[:99] + "…"
    raise UnsupportedEncodingError(
        f"Content-Encoding {shown!r} is not supported: send the body as it is, or compressed "
        f"once with {GZIP} or {ZSTD}"
    )


@dataclass(frozen=True)
class Limits:
    """How far a compressed body may expand."""

    #: INGEST_MAX_BODY_BYTES: the decompressed body's largest size.
    max_bytes: int
    #: INGEST_MAX_COMPRESSION_RATIO: decompressed size over compressed size, at most.
    max_ratio: float

    def limit(self, compressed: int) -> int:
        """The most bytes a body of ``compressed`` bytes may decompress to."""
        return min(self.max_bytes, int(self.max_ratio * compressed))

    def exceeded(self, compressed: int, produced: int) -> InflatedTooLargeError:
        """The 413 for a body that passed its limit, naming the limit that stopped it."""
        if self.limit(compressed) == self.max_bytes:
            message = (
                f"the body decompresses to more than {self.max_bytes} bytes "
                "(INGEST_MAX_BODY_BYTES): send fewer events per request"
            )
        else:
            message = (
                f"the body ({compressed} bytes) decompresses to more than {self.max_ratio:g} "
                "times its size (INGEST_MAX_COMPRESSION_RATIO), which only a compression bomb "
                "or a degenerate body does: send real events"
            )
        return InflatedTooLargeError(message, decompressed=produced)


def _corrupt(encoding: str, what: str = "damaged or truncated") -> CorruptBodyError:
    return CorruptBodyError(
        f"the body is not valid {encoding} ({what}): send it again, compressed whole"
    )


def _gunzip(body: bytes, limits: Limits) -> bytes:
    limit = limits.limit(len(body))
    out: list[bytes] = []
    produced = 0
    view = memoryview(body)
    at = 0  # the first byte of the body not given to zlib yet
    while True:  # one gzip member per round
        if body[at : at + 2] != _GZIP_MAGIC:
            raise _corrupt(GZIP, "not a gzip stream" if at == 0 else "data after its end")
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        while not inflater.eof:
            # Input in pieces too: zlib copies what it has not read into unconsumed_tail at
            # every call, which over a whole large body would be quadratic.
            pending: bytes | memoryview = inflater.unconsumed_tail
            if not pending:
                pending, at = view[at : at + GZIP_STEP], min(at + GZIP_STEP, len(body))
            try:
                chunk = inflater.decompress(pending, GZIP_STEP)
            except zlib.error:
                raise _corrupt(GZIP) from None
            produced += len(chunk)
            if produced > limit:
                raise limits.exceeded(len(body), produced)
            out.append(chunk)
            if not pending and not chunk and not inflater.eof:
                raise _corrupt(GZIP)  # all input read, the member not finished: truncated
        at -= len(inflater.unused_data)
        if at >= len(body):
            return b"".join(out)


def _unzstd(body: bytes, limits: Limits) -> bytes:
    if not body:
        raise _corrupt(ZSTD, "empty")
    limit = limits.limit(len(body))
    out: list[bytes] = []
    produced = 0
    view = memoryview(body)
    at = 0
    while at < len(body):  # one zstd frame per round
        try:
            window = zstandard.get_frame_parameters(view[at:]).window_size
        except zstandard.ZstdError:
            raise _corrupt(ZSTD, "not a zstd stream" if at == 0 else "data after its end") from None
        if window > ZSTD_MAX_WINDOW:
            raise InflatedTooLargeError(
                f"the zstd body needs a {window}-byte window to decompress; at most "
                f"{ZSTD_MAX_WINDOW} is accepted: compress at level 19 or below, without --long",
                decompressed=produced,
            )
        frame = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
        while not frame.eof:
            if at >= len(body):
                raise _corrupt(ZSTD)  # all input read, the frame not finished: truncated
            # Few enough bytes that this step's output cannot pass the limit by much.
            step = max(_ZSTD_MIN_STEP, (limit - produced) // _ZSTD_PER_BYTE)
            piece = view[at : at + step]
            try:
                chunk = frame.decompress(piece)
            except zstandard.ZstdError:
                raise _corrupt(ZSTD) from None
            produced += len(chunk)
            if produced > limit:
                raise limits.exceeded(len(body), produced)
            out.append(chunk)
            # At the frame's end the bytes of the piece after it are left over.
            at += len(piece) - len(frame.unused_data)
    return b"".join(out)


def decompress(body: bytes, encoding: str, limits: Limits) -> bytes:
    """``body`` decoded from ``encoding`` (``identity`` returns it as it is).

    Raises InflatedTooLargeError (413) once the output passes ``limits`` (never more than
    MAX_OVERSHOOT bytes past it), CorruptBodyError (400) for a body that is not valid
    ``encoding``."""
    if encoding == IDENTITY:
        return body
    if encoding == GZIP:
        return _gunzip(body, limits)
    if encoding == ZSTD:
        return _unzstd(body, limits)
    raise UnsupportedEncodingError(encoding)


__all__ = [
    "ACCEPT_ENCODING",
    "ENCODINGS",
    "GZIP",
    "IDENTITY",
    "MAX_OVERSHOOT",
    "ZSTD",
    "CorruptBodyError",
    "InflatedTooLargeError",
    "Limits",
    "UnsupportedEncodingError",
    "content_encoding",
    "decompress",
]
