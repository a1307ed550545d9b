"""`cratemae analyze`: measure what each encoder layer does (stub until it lands)."""

from __future__ import annotations

from cratemae.errors import NotBuiltError

__all__ = ["analyze"]


def analyze() -> None:
    """Measure what each encoder layer does and draw it.

    Examples:
      $ cratemae analyze --help
      $ cratemae analyze
    """
    raise NotBuiltError("cratemae analyze is not built yet")
