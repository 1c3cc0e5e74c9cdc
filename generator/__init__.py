"""Synthetic ad-event generator writing Arrow IPC micro-batches into the spool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from generator.runner import GenerateSummary, generate

__all__ = ["GenerateSummary", "generate"]

#: Shapes of event_id: ``sequential`` is ``<producer>-<seed>-<seq>`` (33 bytes for "gen"), whose
#: shared prefix and ordered tail are kinder to a key cache than real ids; ``hex33`` is 33
#: random-looking hex digits, as SDKs send (the shape issue 12's targets are measured with).
#: Here, not in ``generator.model``, so the CLI's parser can list them without NumPy.
ID_SHAPES: Final = ("sequential", "hex33")


def __getattr__(name: str) -> Any:
    # Lazy, so building the CLI parser (generator.command) does not import NumPy and Polars.
    if name in __all__:
        from generator import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
