"""Run a function right after another package is imported, without importing it ourselves.

`import cratemae` must make `timm.create_model("crate_mae_base")` work, but importing timm
(and with it torch) costs seconds, and every `cratemae` command line call imports this
package. So registration waits for timm: if it is already imported, it happens now;
otherwise a finder on `sys.meta_path` wraps timm's loader, and the function runs as soon
as `import timm` has finished, wherever that import happens. Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType

__all__ = ["call_after_import"]


def _run(target: str, package: str) -> None:
    """Import `module:function` and call it; a failure warns instead of breaking the
    import that triggered it."""
    module_name, _, func_name = target.partition(":")
    try:
        getattr(importlib.import_module(module_name), func_name)()
    except Exception as err:  # the user's `import timm` must not fail because of us
        warnings.warn(f"cratemae: could not run {target} after importing {package}: {err}",
                      RuntimeWarning, stacklevel=2)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; hands back the real spec of `package` with its loader's
    `exec_module` wrapped so that `target` runs once the module body has executed."""

    def __init__(self, package: str, target: str) -> None:
        self.package, self.target = package, target
        self._lock = threading.Lock()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.package:
            return None
        with self._lock:
            if self not in sys.meta_path:  # another thread got here first
                return None
            sys.meta_path.remove(self)  # one use only, and keeps the search below from recursing
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_run(module: ModuleType) -> None:
            exec_module(module)
            _run(self.target, self.package)

        loader.exec_module = exec_then_run  # type: ignore[method-assign]
        return spec


def call_after_import(package: str, target: str) -> None:
    """Call `target` ("module:function") now if `package` is imported, else right after it
    is. Installing the same pair twice has no further effect."""
    if package in sys.modules:
        _run(target, package)
        return
    for finder in sys.meta_path:
        if isinstance(finder, _AfterImportFinder) and (finder.package, finder.target) == (
            package,
            target,
        ):
            return
    sys.meta_path.insert(0, _AfterImportFinder(package, target))
