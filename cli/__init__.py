"""The ``adevents`` command line: the one package that wires the product.

Settings are read here once, from the environment and the flags, and passed down; every
subcommand comes from one registry (:data:`cli.commands.COMMANDS`). This is the top layer:
it may import every package, and no package imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from cli.commands import COMMANDS
from pipeline.settings import IngestSettings, JobSettings, Settings, SettingsError

__all__ = ["COMMANDS", "build_parser", "main"]

#: argparse dests that are also settings fields: a flag given on the command line overrides env.
SETTING_NAMES = frozenset(
    f.name for cls in (Settings, JobSettings, IngestSettings) for f in fields(cls)
)


def _settings_epilog() -> str:
    rows = [
        f"  {name:<24} {help} (default {default})" for name, default, help in Settings.describe()
    ]
    return "environment variables (CLI flags override them):\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The ``adevents`` parser: one subparser per registered command, each with its flags."""
    parser = argparse.ArgumentParser(
        prog="adevents",
        description="adevents: an exactly-once ad-event pipeline over a Parquet lake.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=_settings_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--data-dir", help="data directory (DATA_DIR, default ./ad_event_data)")
        p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)")
        command.add_arguments(p)
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line that name a setting (None: not given)."""
    return {k: v for k, v in vars(args).items() if k in SETTING_NAMES and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, read the settings once, run the subcommand; its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**overrides(args))
    except SettingsError as exc:
        print(f"adevents: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return COMMANDS[args.command].run(args, settings)
