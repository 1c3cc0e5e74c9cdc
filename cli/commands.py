"""The registry of ``adevents`` subcommands: name → where its flags and its run function live.

Each subcommand lives in the package it belongs to (``generator.command``, ``queries.command``,
``api.command``, ``jobs.command``) or, when it wires several packages, here in ``cli``. A
module is imported only when its subcommand's parser is built or it runs, so ``--help`` stays
fast and optional parts stay optional.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

from pipeline.settings import Settings


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line and the module with its ``configure``/``run`` functions.

    ``configure(parser)`` adds the subcommand's flags; ``run(args, settings) -> int`` runs it
    with the settings the CLI read once, and returns the exit code.
    """

    help: str
    module: str
    configure: str = "configure"
    run_name: str = "run"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(self.module), self.configure)(parser)

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        return int(getattr(importlib.import_module(self.module), self.run_name)(args, settings))


def _job_commands() -> dict[str, Command]:
    # jobs.command picks the job from the parser's name / args.command.
    from jobs.command import COMMANDS as JOB_COMMANDS

    return {name: Command(help, "jobs.command") for name, (help, _, _) in JOB_COMMANDS.items()}


COMMANDS: dict[str, Command] = {
    "generate": Command(
        "write synthetic ad events into the spool (incoming/)", "generator.command"
    ),
    "consume": Command(
        "validate, deduplicate, enrich and land spool files as Parquet, exactly once",
        "cli.consume",
    ),
    "bench": Command(
        "measure events/s against a ceiling and a naive baseline, and reconcile the output",
        "cli.bench",
    ),
    "sql": Command(
        "run ad-hoc SQL over the lake's DuckDB views (no query: interactive prompt)",
        "queries.command",
    ),
    "quarantine": Command(
        "rejected rows by reason and time (list, show) and their replay through the spool, "
        "optionally corrected by SQL (replay)",
        "cli.quarantine",
    ),
    "serve": Command(
        "serve the API and dashboard (Litestar on uvicorn)",
        "api.command",
        "configure_serve",
        "run_serve",
    ),
    "demo": Command(
        "run generator, consumer, scheduled jobs and API together; print the dashboard URL",
        "cli.demo",
    ),
    **_job_commands(),
}
