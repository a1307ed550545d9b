"""The package's layout rules, read from the source (no imports are executed).

Each package's docstring ends with a `May import:` line naming the packages of cratemae it may
use; these tests hold every import (lazy ones inside functions included) to that line, state
the rules that must never be relaxed, find import cycles between modules, and keep the
command modules thin.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

import cratemae

ROOT = Path(cratemae.__file__).parent
# Modules at the top of the package that every package may use: they import nothing of it.
BASE = {"errors", "fs", "guard", "lock", "rundir"}
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[str]:
    """Every `cratemae...` module `path` imports (`from a import b`: `a.b` when `a/b` is a
    module of the package, else `a`), anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "cratemae"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "cratemae":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: sorted(set(imports_of(path))) for name, path in MODULES.items()}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""  # "" is the root package itself


def may_import(package: str) -> set[str] | None:
    """The `May import:` line of a package's docstring (None: anything)."""
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    match = re.search(r"^May import: (.*)$", doc, re.M)
    assert match, f"cratemae/{package}/__init__.py: the docstring has no 'May import:' line"
    text = match.group(1).rstrip(".")
    if text.startswith("nothing"):
        return set()
    if text.startswith("everything"):
        return None
    return {w.strip() for w in text.split(",")}


def upward_imports(package: str) -> list[str]:
    allowed = may_import(package)
    if allowed is None:
        return []
    bad = []
    for module, targets in GRAPH.items():
        if package_of(module) != package:
            continue
        for target in targets:
            other = package_of(target)
            if other in (package, "") or other in BASE:
                continue
            if other not in allowed:
                bad.append(f"{module} imports {target}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_imports_only_what_its_docstring_allows(package: str) -> None:
    assert upward_imports(package) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_says_what_lives_there(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    assert len(doc.splitlines()[0]) > 20


def test_the_rules_that_never_relax() -> None:
    """Whatever a docstring says, these hold: the model imports nothing else; the data never
    import the loop, tasks or commands; the runtime imports neither data nor the loop."""
    assert may_import("model") == set()
    assert not may_import("data") & {"train", "tasks", "commands", "eval", "weights"}
    assert not may_import("distributed") & {"data", "train", "tasks", "commands"}
    for package in PACKAGES:
        if package != "commands":
            allowed = may_import(package)
            assert allowed is not None and "commands" not in allowed, package
    # the top-level modules stay at the bottom: they import only each other (guard uses
    # errors and rundir), never a package
    for base in BASE:
        path = ROOT / f"{base}.py"
        if path.is_file():
            assert set(GRAPH[f"cratemae.{base}"]) <= {f"cratemae.{b}" for b in BASE}, base
    assert GRAPH["cratemae.errors"] == GRAPH["cratemae.fs"] == GRAPH["cratemae.rundir"] == []
    assert GRAPH["cratemae.lock"] == []


def test_nothing_imports_the_commands() -> None:
    for module, targets in GRAPH.items():
        if package_of(module) in ("commands", "__main__") or module == "cratemae.__main__":
            continue
        assert not [t for t in targets if package_of(t) == "commands"], module


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    # A package's __init__ re-exporting its modules is not a cycle: leave those edges out.
    graph = {m: [t for t in ts if not (MODULES[m].name == "__init__.py"
                                        and t.startswith(m + "."))]
             for m, ts in GRAPH.items()}
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_commands_share_helpers_through_the_private_module_only() -> None:
    """A command module imports no sibling command; shared helpers live in `_cli_utils`
    (and the terminal output in `console`)."""
    shared = {"cratemae.commands._cli_utils", "cratemae.commands.console",
              "cratemae.commands.app", "cratemae.commands"}
    for module, targets in GRAPH.items():
        if package_of(module) != "commands" or module in shared:
            continue
        siblings = [t for t in targets if package_of(t) == "commands" and t not in shared]
        assert siblings == [], f"{module} imports {siblings}"


def test_one_task_never_imports_another() -> None:
    """Helpers of a task that are not tasks (pre-training's validation, the preprocessing an
    evaluation takes from its checkpoint) may be imported."""
    helpers = {"cratemae.tasks.monitor", "cratemae.tasks.follow"}
    for module, targets in GRAPH.items():
        if package_of(module) != "tasks" or module in {"cratemae.tasks", *helpers}:
            continue
        others = [t for t in targets if package_of(t) == "tasks" and t not in {module, *helpers}]
        assert others == [], f"{module} imports {others}"


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The rule checker itself: a data module importing the training loop is reported."""
    GRAPH["cratemae.data.__probe__"] = ["cratemae.train.trainer"]
    try:
        assert upward_imports("data") == ["cratemae.data.__probe__ imports cratemae.train.trainer"]
    finally:
        del GRAPH["cratemae.data.__probe__"]


def test_packages_are_the_concerns_of_the_layout() -> None:
    expected = {"analysis", "bench", "checkpoints", "commands", "data", "distributed", "eval",
                "model", "recipe", "tasks", "train", "viz", "weights"}
    assert set(PACKAGES) == expected
    counts = defaultdict(int)
    for module in MODULES:
        counts[package_of(module)] += 1
    # no package gathers every concern again (data: 24, seven of them its download formats)
    assert max(counts.values()) < 25


def test_files_are_replaced_only_through_the_atomic_helper() -> None:
    """No module but `cratemae.fs` writes a file in place (`write_text`, `write_bytes`, or
    `open` for writing): a failure then never leaves a half-written file where a good one
    was. Appending (metrics.jsonl, log.txt) adds lines and is not a replacement; a tar
    written into the helper's open file (`fileobj=`) is the helper's write."""
    found = []
    for module, path in MODULES.items():
        if module == "cratemae.fs":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("write_text", "write_bytes"):
                found.append(f"{module}:{node.lineno} {name}")
            if name == "open" and not any(k.arg == "fileobj" for k in node.keywords):
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                modes += [k.value.value for k in node.keywords
                          if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if any(isinstance(m, str) and ("w" in m or "x" in m) for m in modes):
                    found.append(f"{module}:{node.lineno} open({modes[0]!r})")
    assert found == []


def test_json_is_written_strictly() -> None:
    """JSON has no NaN or Infinity: every `json.dumps` outside `cratemae.fs` either says
    `allow_nan=False` (internal records, hashes: a NaN there is a bug, and raises) or the
    output goes through `cratemae.fs.strict_json` (null, with the field named)."""
    found = []
    for module, path in MODULES.items():
        if module == "cratemae.fs":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "dumps"
                    and getattr(node.func.value, "id", "") == "json"
                    and not any(k.arg == "allow_nan" for k in node.keywords)):
                found.append(f"{module}:{node.lineno}")
    assert found == []


def test_only_rundir_spells_the_names_of_run_files() -> None:
    """The files and folders of a run are named in `cratemae.rundir` alone: no other module
    has a string (docstrings aside) that is one of those names or a path inside a folder."""
    from cratemae import rundir

    files = {v for k, v in vars(rundir).items() if k.endswith("_FILE")}
    folders = {v for k, v in vars(rundir).items() if k.endswith("_DIR") and isinstance(v, str)}
    assert {"metrics.jsonl", "status.json", "model.safetensors"} <= files
    assert {"checkpoints", "samples", "tensorboard"} <= folders
    found = []
    for name, path in MODULES.items():
        if name == "cratemae.rundir":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
                and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docs:
                text = node.value
                if text in files or any(text.startswith(f"{d}/") for d in folders):
                    found.append(f"{name}:{node.lineno} {text!r}")
    assert found == []
