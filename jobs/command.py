"""The jobs' subcommands: ``scheduler``, ``rollup``, ``compact``, ``alerts`` and ``retention``.

:data:`COMMANDS` maps each name to (help, configure, run), which the ``adevents`` CLI registers;
the generic :func:`configure`/:func:`run` pick the subcommand from the parser's name /
``args.command``.
``rollup``, ``compact`` and ``retention`` run once with ``--once`` (for cron) and otherwise
alone on their schedule; ``alerts check`` evaluates the rules once and delivers the webhook.
Every run function takes the :class:`~pipeline.settings.Settings` its caller read once (job
flags such as ``--compact-target-bytes`` included, in ``settings.jobs``) and reads nothing else;
it builds the lake's :class:`~lake.location.LakeLocation` from them once, checks it (a bad
LAKE_URI or AWS_* setting exits with status 2 and a message naming it) and passes it down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pipeline.settings import JobSettings, Settings

if TYPE_CHECKING:
    from lake.location import LakeLocation

log = logging.getLogger("adevents.jobs")

Runner = Callable[[argparse.Namespace, Settings], int]
Configure = Callable[[argparse.ArgumentParser], None]

SCHEDULED: Final = ("rollup", "compact", "alerts", "retention", "webhook")


def _add_epilog(parser: argparse.ArgumentParser) -> None:
    rows = [f"  {n:<32} {h} (default {d})" for n, d, h in JobSettings.describe()]
    text = "job settings (environment variables):\n" + "\n".join(rows)
    parser.epilog = f"{parser.epilog}\n\n{text}" if parser.epilog else text
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


# -- configure ---------------------------------------------------------------------------------
def configure_scheduler(parser: argparse.ArgumentParser) -> None:
    _add_epilog(parser)
    parser.add_argument(
        "--only",
        metavar="JOBS",
        help=f"comma-separated jobs to run (default all of {', '.join(SCHEDULED)})",
    )


def configure_rollup(parser: argparse.ArgumentParser) -> None:
    _add_epilog(parser)
    parser.add_argument("--once", action="store_true", help="bring rollups up to date, then exit")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="recompute every rollup from the events table (with --once)",
    )
    parser.add_argument("--rollup-interval", help="period when not --once (ROLLUP_INTERVAL)")


def configure_compact(parser: argparse.ArgumentParser) -> None:
    _add_epilog(parser)
    parser.add_argument("--once", action="store_true", help="compact what needs it, then exit")
    parser.add_argument("--compact-target-bytes", help="bytes per file (COMPACT_TARGET_BYTES)")
    parser.add_argument("--compact-min-age", help="hour closed after (COMPACT_MIN_AGE)")
    parser.add_argument("--compact-interval", help="period when not --once (COMPACT_INTERVAL)")


def configure_alerts(parser: argparse.ArgumentParser) -> None:
    _add_epilog(parser)
    parser.add_argument(
        "action",
        choices=("check", "list"),
        help="check: evaluate every rule once (and deliver the webhook); list: show alerts",
    )
    parser.add_argument("--open", action="store_true", help="list: open alerts only")
    parser.add_argument("--limit", type=int, default=50, help="list: at most this many (50)")
    parser.add_argument("--json", action="store_true", help="list: one JSON object per line")


def configure_retention(parser: argparse.ArgumentParser) -> None:
    _add_epilog(parser)
    parser.add_argument("--once", action="store_true", help="delete what expired, then exit")
    parser.add_argument("--retention-days", help="days of events to keep (RETENTION_DAYS)")
    parser.add_argument(
        "--vacuum-retention", help="unused lake files deleted after (VACUUM_RETENTION)"
    )
    parser.add_argument("--retention-interval", help="period when not --once (RETENTION_INTERVAL)")


# -- run ---------------------------------------------------------------------------------------
def _lake(name: str, settings: Settings) -> LakeLocation | None:
    """The lake the settings name, checked; None (after saying which setting) when unusable."""
    from lake.location import LakeConfigError, LakeLocation

    try:
        location = LakeLocation.from_settings(settings)
        location.check()
    except LakeConfigError as exc:
        print(f"adevents {name}: {exc}", file=sys.stderr)
        return None
    return location


def _once(name: str, call: Callable[[], str]) -> int:
    from jobs.storage import JobBusyError

    try:
        line = call()
    except JobBusyError as exc:
        print(f"adevents {name}: {exc}; skipped", file=sys.stderr)
        return 0
    except Exception:
        log.exception("%s failed", name)
        return 1
    print(line)
    return 0


def lower_priority(settings: Settings) -> None:
    """Run this process JOBS_NICE below its parent: a clustering or a rollup rebuild takes whole
    cores for minutes, and must not take them from the consumer and the API on the machine."""
    if settings.jobs.jobs_nice:
        os.nice(settings.jobs.jobs_nice)


def _serve(name: str, jobs: list[str], settings: Settings) -> int:
    from jobs.scheduler import serve
    from jobs.tasks import job_specs
    from pipeline.signals import stop_on_signals

    lower_priority(settings)
    location = _lake(name, settings)
    if location is None:
        return 2
    specs = [s for s in job_specs(settings, location) if s.name in jobs]
    with stop_on_signals(what="stopping after the running jobs") as stop:
        return serve(specs, stop)


def run_scheduler(args: argparse.Namespace, settings: Settings) -> int:
    names = list(SCHEDULED)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(SCHEDULED))
        if unknown:
            print(f"adevents scheduler: unknown job(s) {', '.join(unknown)}", file=sys.stderr)
            return 2
    return _serve("scheduler", names, settings)


def _run_job(name: str) -> Runner:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from jobs import tasks

        if not args.once:
            return _serve(name, [name], settings)
        lower_priority(settings)
        location = _lake(name, settings)
        if location is None:
            return 2
        if name == "rollup":
            return _once(name, lambda: tasks.rollup(settings, location, rebuild=args.rebuild))
        if name == "compact":
            return _once(name, lambda: tasks.compact(settings, location))
        return _once(name, lambda: tasks.retention(settings, location))

    return run


def run_alerts(args: argparse.Namespace, settings: Settings) -> int:
    from jobs import tasks
    from pipeline.schema import Layout
    from pipeline.tables import list_alerts

    if args.action == "list":
        for a in list_alerts(Layout(settings.data_dir), open_only=args.open, limit=args.limit):
            if args.json:
                print(json.dumps(a.to_json()))
            else:
                print(
                    f"{a.started_at:%Y-%m-%d %H:%M:%S} {a.status:<8} {a.severity:<8} "
                    f"{a.rule}/{a.subject}: {a.message}"
                )
        return 0
    location = _lake("alerts", settings)
    if location is None:
        return 2
    code = _once("alerts", lambda: tasks.alerts(settings, location))
    if code == 0 and settings.jobs.alert_webhook_url:
        code = _once("alerts", lambda: tasks.webhook(settings))
    return code


COMMANDS: Final[dict[str, tuple[str, Configure, Runner]]] = {
    "scheduler": (
        "run rollups, compaction, alerts and retention on their schedules (APScheduler)",
        configure_scheduler,
        run_scheduler,
    ),
    "rollup": (
        "per-campaign minute/hour/day rollups of new batches (--once: one run, for cron)",
        configure_rollup,
        _run_job("rollup"),
    ),
    "compact": (
        "compact the lake tables' small files, cluster closed hours, checkpoint (--once)",
        configure_compact,
        _run_job("compact"),
    ),
    "alerts": (
        "threshold alerts: 'check' evaluates the rules once, 'list' shows open and recent ones",
        configure_alerts,
        run_alerts,
    ),
    "retention": (
        "delete events and rollups past their retention, vacuum the lake (--once)",
        configure_retention,
        _run_job("retention"),
    ),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Configure whichever of the jobs' subcommands ``parser`` is for (by its prog name)."""
    COMMANDS[parser.prog.split()[-1]][1](parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the subcommand named by ``args.command``."""
    return COMMANDS[args.command][2](args, settings)
