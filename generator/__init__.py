"""Synthetic ad-event generator writing Arrow IPC micro-batches into the spool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from generator.runner import GenerateSummary, generate

__all__ = ["GenerateSummary", "generate"]


def __getattr__(name: str) -> Any:
    # Lazy, so building the CLI parser (generator.command) does not import NumPy and Polars.
    if name in __all__:
        from generator import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
