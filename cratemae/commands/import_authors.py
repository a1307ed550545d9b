"""`cratemae import-authors`: import the authors' checkpoint (stub until it lands)."""

from __future__ import annotations

from cratemae.errors import NotBuiltError

__all__ = ["import_authors"]


def import_authors() -> None:
    """Turn the authors' released checkpoint into a cratemae checkpoint.

    Examples:
      $ cratemae import-authors --help
      $ cratemae import-authors
    """
    raise NotBuiltError("cratemae import-authors is not built yet")
