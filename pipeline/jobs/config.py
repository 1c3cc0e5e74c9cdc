"""The jobs' settings live in :mod:`pipeline.settings`, the one settings tree; re-exported."""

from __future__ import annotations

from pipeline.settings import JobSettings, parse_size

__all__ = ["JobSettings", "parse_size"]
