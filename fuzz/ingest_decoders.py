"""Fuzz target: the ingest's three decoders (JSON array, NDJSON, Arrow IPC stream and file).

Any body must either decode (and pass the row check, its rejected rows becoming a rejected
spool file's table) or raise :class:`pipeline.decode.BodyError`, the decoders' documented client
error (400, or 413 for its subclass TooManyEventsError). Anything else (RecursionError, an Arrow or
Polars exception that escaped, a crash in C) is a finding.

    python fuzz/ingest_decoders.py [corpus_dir] -runs=100000      # libFuzzer options

``tests/test_ingest_hardening.py`` runs it for a bounded number of runs with a seed corpus.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["api", "pipeline.normalize", "pipeline.validate"]):
    from api.ingest_spool import rejected_table
    from pipeline.decode import ARROW_FILE, ARROW_STREAM, JSON, NDJSON, BodyError, check, decode

#: The first byte of an input picks the decoder; the rest is the body.
MEDIA = (JSON, NDJSON, ARROW_STREAM, ARROW_FILE)
#: Small limits, so the fuzzer reaches them with short inputs.
MAX_DEPTH = 8
MAX_EVENTS = 64
NOW_MS = 1_764_236_000_000


def one_input(data: bytes) -> None:
    if not data:
        return
    media = MEDIA[data[0] % len(MEDIA)]
    try:
        table = decode(data[1:], media, max_depth=MAX_DEPTH, max_events=MAX_EVENTS)
    except BodyError:
        return
    checked = check(table, now_ms=NOW_MS)
    if checked.rejected is not None:
        rejected_table(checked.rejected, NOW_MS)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
