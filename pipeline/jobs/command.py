"""Temporary alias of :mod:`jobs.command` for ``pipeline/cli.py`` (see the package docstring)."""

from __future__ import annotations

from jobs.command import COMMANDS

__all__ = ["COMMANDS"]
