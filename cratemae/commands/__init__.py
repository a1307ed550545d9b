"""The `cratemae` command line: one module per command, discovered through entry points.

To add a command, write a function in its own module (shared options and helpers from
`_cli_utils.py`, output through `console.py`, failures as `cratemae.errors.CrateMAEError`)
and list it under
`[project.entry-points."cratemae.commands"]` in `pyproject.toml`; see `app.py`.

May import: everything; nothing imports the commands.
"""

from cratemae.commands.app import build_app, main

__all__ = ["build_app", "main"]
