"""The `cratemae` command line: one module per command, discovered through entry points.

To add a command, write a function in its own module (options from `options.py`, output
through `console.py`, failures as `cratemae.errors.CrateMAEError`) and list it under
`[project.entry-points."cratemae.commands"]` in `pyproject.toml`; see `app.py`.
"""

from cratemae.commands.app import build_app, main

__all__ = ["build_app", "main"]
