"""`cratemae bench`: time training steps (stub until it lands)."""

from __future__ import annotations

from cratemae.errors import NotBuiltError

__all__ = ["bench"]


def bench() -> None:
    """Time complete training steps and print images per second.

    Examples:
      $ cratemae bench --help
      $ cratemae bench
    """
    raise NotBuiltError("cratemae bench is not built yet")
