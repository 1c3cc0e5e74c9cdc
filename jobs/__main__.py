"""``python -m jobs <command>``: the jobs' subcommands as ``adevents`` runs them."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.command import COMMANDS
from pipeline.settings import JobSettings, Settings, SettingsError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adevents", description="adevents scheduled jobs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data-dir", help="data directory (DATA_DIR)")
        p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)")
        configure(p)
    args = parser.parse_args(argv)
    # Flags that name a setting (--data-dir, --compact-target-rows, ...) override the environment.
    names = {f.name for cls in (Settings, JobSettings) for f in fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"adevents: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return COMMANDS[args.command][2](args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
