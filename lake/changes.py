"""What a table gained between two versions: the rows its append commits inserted.

Delta's change feed (``DeltaTable.load_cdf``) of an append-only table returns, per version, the
rows of the files that commit added. Maintenance commits add no rows to it: an ``optimize``
(compaction) and the clustering of an hour add their rewritten files with
``dataChange = false``, which the feed skips, so a compaction never makes old rows look new.
A ``DELETE`` (retention) is left out altogether: its feed would read the removed files, which
``vacuum`` may already have taken, and it inserts nothing. Each row carries
``_commit_version``, the version that added it, so a reader that keeps its own per-part
version can take exactly the rows it has not seen.

The feed of a version can only be read while its files exist: after ``vacuum`` (a reader behind
by more than VACUUM_RETENTION), or once its log entries are cleaned up, :func:`inserted` raises
:class:`FeedUnavailableError` and the caller reads a snapshot instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

#: The column naming the version that inserted a row.
COMMIT_VERSION: Final = "_commit_version"
_CHANGE_TYPE: Final = "_change_type"


class FeedUnavailableError(RuntimeError):
    """The change feed of some version in the span can no longer be read."""


def appended_ranges(
    history: Sequence[Mapping[str, Any]], after: int, upto: int
) -> list[tuple[int, int]] | None:
    """Inclusive runs of the versions in (after, upto] whose change feed can be read: all but
    deletes.

    None when ``history`` (``DeltaTable.history``) lacks a version of the span (its log was
    cleaned up).
    """
    operations = {int(commit["version"]): commit.get("operation") for commit in history}
    runs: list[tuple[int, int]] = []
    for version in range(after + 1, upto + 1):
        if version not in operations:
            return None
        if operations[version] == "DELETE":
            continue
        if runs and runs[-1][1] == version - 1:
            runs[-1] = (runs[-1][0], version)
        else:
            runs.append((version, version))
    return runs


def inserted(
    table: DeltaTable, after: int, upto: int, columns: Sequence[str]
) -> Iterator[pl.DataFrame]:
    """The rows inserted by the versions in (after, upto] of ``table``, as frames (lake types:
    microsecond times) of ``columns`` plus :data:`COMMIT_VERSION`, streamed (memory bounded
    by a batch, not by the span). Version 0 (the table's creation) inserts nothing and is
    never read.

    Raises :class:`FeedUnavailableError` when some version's feed cannot be read any more.
    """
    after = max(after, 0)
    if upto <= after:
        return
    runs = appended_ranges(table.history(upto - after), after, upto)
    if runs is None:
        raise FeedUnavailableError(f"the log no longer holds every version in ({after}, {upto}]")
    wanted = [*columns, COMMIT_VERSION, _CHANGE_TYPE]
    for start, end in runs:
        for batch in _feed(table, start, end, wanted):
            # Polars, not pyarrow compute: the feed's strings are string_view, which pyarrow's
            # filter kernels do not take.
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            inserts = frame.filter(pl.col(_CHANGE_TYPE) == "insert")
            if len(inserts):
                yield inserts.select(*columns, COMMIT_VERSION)


def _feed(table: DeltaTable, start: int, end: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The feed of versions [start, end]; an unreadable one as :class:`FeedUnavailableError`."""
    try:
        reader = pa.RecordBatchReader.from_stream(
            table.load_cdf(starting_version=start, ending_version=end, columns=columns)
        )
        yield from reader
    except (DeltaError, OSError, pa.ArrowException) as exc:
        raise FeedUnavailableError(
            f"the change feed of versions {start}-{end} is unreadable ({exc})"
        ) from exc
