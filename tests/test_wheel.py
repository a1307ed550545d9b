"""The package a user installs. An sdist is built from a copy of the checkout and the wheel
from that sdist (as `python -m build` does), without a warning; both hold every module, the
shipped recipes and `py.typed`, with current metadata. The wheel, installed into a fresh
virtual environment outside the checkout, runs from an empty folder: `--version`, `recipes`,
a few steps of `pretrain demo` and `reconstruct`.

The fresh environment gets its dependencies from the running one's site-packages (through a
folder of links that leaves out every trace of cratemae), so nothing is downloaded and the
only cratemae it can import is the wheel's.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from support import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
# Not sources: what a checkout accumulates (runs, caches, environments, earlier builds).
LEFT_OUT = shutil.ignore_patterns(
    ".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".pytest-cache-data", ".ruff_cache",
)
RECIPES = sorted(p.relative_to(REPO / "recipes").as_posix()
                 for p in (REPO / "recipes").rglob("*.toml"))
MODULES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "cratemae").rglob("*.py")
                 if "__pycache__" not in p.parts)


# --- pyproject.toml -------------------------------------------------------------------------
def test_pyproject_lists_every_package_and_maps_the_recipes_folder() -> None:
    """The packages are listed by hand (the recipes folder is mapped into the package), so a
    new package of cratemae/ must be added there: this says which."""
    tool = PYPROJECT["tool"]["setuptools"]
    code = {".".join(p.parent.relative_to(REPO).parts)
            for p in (REPO / "cratemae").rglob("__init__.py")}
    recipes = {".".join(("cratemae", *p.parent.relative_to(REPO).parts))
               for p in (REPO / "recipes").rglob("*.toml")}
    assert set(tool["packages"]) == code | recipes
    assert tool["package-dir"] == {"cratemae.recipes": "recipes"}
    assert all(tool["package-data"][name] == ["*.toml"] for name in recipes)
    assert tool["package-data"]["cratemae"] == ["py.typed"]


def test_pyproject_metadata_is_current() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "Typing :: Typed" in project["classifiers"]
    assert project["urls"]
    extras = project["optional-dependencies"]
    assert {"onnx", "plot", "all", "test"} <= set(extras)
    assert extras["all"] == ["cratemae[onnx,parquet,plot,wandb]"]
    assert "recipes" in PYPROJECT["project"]["entry-points"]["cratemae.commands"]


def test_the_version_is_the_installed_one() -> None:
    import cratemae

    assert cratemae.__version__ == metadata.version("cratemae") == VERSION


# --- the build --------------------------------------------------------------------------------
def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> str:
    """Run a command; its output (stdout and stderr), or a failure that shows it."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output}"
    return output


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # setuptools warns that it cannot byte-compile
    return env


BUILD = "import sys, setuptools.build_meta as b; print('built:', b.build_{}(sys.argv[1]))"


def _built(log: str) -> str:
    return next(line for line in log.splitlines() if line.startswith("built: ")).split()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """{"sdist", "wheel", "log"}: the sdist of a copy of the checkout, the wheel built from
    the unpacked sdist, and what the two builds printed (warnings shown)."""
    tmp = tmp_path_factory.mktemp("build")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(REPO, src, ignore=LEFT_OUT, symlinks=True)
    py = [sys.executable, "-W", "always", "-c"]
    log = _run([*py, BUILD.format("sdist"), str(dist)], cwd=src, env=_build_env())
    sdist = dist / _built(log)
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.11.4+
        tar.extractall(tmp / "unpacked", **safe)  # type: ignore[arg-type]
    unpacked = tmp / "unpacked" / f"cratemae-{VERSION}"
    wheel_log = _run([*py, BUILD.format("wheel"), str(dist)], cwd=unpacked, env=_build_env())
    wheel = dist / _built(wheel_log)
    return {"sdist": sdist, "wheel": wheel, "log": log + wheel_log}


def test_building_prints_no_warning(built: dict[str, object]) -> None:
    log = str(built["log"])
    bad = [line for line in log.lower().splitlines() if "warning" in line or "deprecat" in line]
    assert not bad, "\n".join(bad)


def test_the_wheel_holds_every_module_the_recipes_and_py_typed(built: dict[str, object]) -> None:
    with zipfile.ZipFile(built["wheel"]) as whl:  # type: ignore[arg-type]
        names = set(whl.namelist())
        meta = email.message_from_bytes(whl.read(f"cratemae-{VERSION}.dist-info/METADATA"))
        entry_points = whl.read(f"cratemae-{VERSION}.dist-info/entry_points.txt").decode()
    assert set(MODULES) <= names, sorted(set(MODULES) - names)
    assert {f"cratemae/recipes/{r}" for r in RECIPES} <= names
    assert {"cratemae/py.typed", "cratemae/recipes/__init__.py"} <= names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cratemae", f"cratemae-{VERSION}.dist-info"}, tops
    assert meta["Version"] == VERSION and meta["License-Expression"] == "MIT"
    assert "Paper, https://arxiv.org/abs/2404.02446" in meta.get_all("Project-URL")
    assert {"onnx", "plot", "all"} <= set(meta.get_all("Provides-Extra"))
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert "recipes = cratemae.commands.recipes:recipes" in entry_points


def test_the_sdist_holds_the_sources_and_the_recipes(built: dict[str, object]) -> None:
    with tarfile.open(built["sdist"]) as tar:  # type: ignore[arg-type]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "recipes/__init__.py"} <= names
    assert set(MODULES) <= names and {f"recipes/{r}" for r in RECIPES} <= names


# --- the installed wheel ----------------------------------------------------------------------
def _site_dirs() -> list[Path]:
    """Where the running interpreter finds installed distributions, in its order: its
    site-packages and any folder a `.pth` file adds; never the checkout."""
    dirs: list[Path] = []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path != REPO and path not in dirs and path.is_dir() and any(path.glob("*.dist-info")):
            dirs.append(path)
    return dirs


def _deps_view(into: Path) -> Path:
    """A folder of links to everything installed for the running interpreter except cratemae
    (its metadata, its editable-install finder): the dependencies, and only them."""
    into.mkdir()
    for folder in _site_dirs():
        for entry in folder.iterdir():
            name = entry.name.lower()
            if name.startswith(("cratemae", "__editable__", "_cratemae", "__pycache__")):
                continue
            if not (into / entry.name).is_symlink():  # the first found wins, as on sys.path
                (into / entry.name).symlink_to(entry)
    return into


@pytest.mark.slow
def test_the_installed_wheel_runs_from_an_empty_folder(
    built: dict[str, object], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                          "['purelib'])"], cwd=tmp_path).strip())
    (site / "_dependencies.pth").write_text(f"{_deps_view(tmp_path / 'deps')}\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--disable-pip-version-check", "-q", str(built["wheel"])], cwd=tmp_path)

    here = tmp_path / "empty"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cratemae = str(venv / "bin" / "cratemae")

    def run(*args: str) -> str:
        return _run([*args], cwd=here, env=env)

    assert run(cratemae, "--version").strip() == f"cratemae {VERSION}"
    where = run(str(python), "-c", "import cratemae, importlib.metadata as m, importlib.resources"
                " as r; print(cratemae.__file__, cratemae.__version__, m.version('cratemae'),"
                " r.files('cratemae.recipes'))").split()
    assert where[0].startswith(str(site)) and where[3].startswith(str(site))  # not the checkout
    assert where[1] == where[2] == VERSION
    listed = [line.split()[0] for line in run(cratemae, "recipes").splitlines()]
    assert sorted(listed) == sorted(r.removesuffix(".toml") for r in RECIPES)

    tiny = ["model.depth=1", "model.decoder_depth=1", "model.embed_dim=32",
            "model.decoder_embed_dim=32", "schedule.max_steps=2", "data.batch_size=8"]
    run(cratemae, "pretrain", "demo", *[a for s in tiny for a in ("--set", s)], "--out", "run")
    run(str(python), "-c", "from PIL import Image; Image.new('RGB', (48, 40), (200, 60, 20))"
        ".save('photo.png')")
    out = run(cratemae, "reconstruct", "photo.png", "--checkpoint", "run", "--out", "recon.png")
    assert "photo.png: PSNR" in out, out
    assert (here / "recon.png").is_file() and (here / "run" / "checkpoints" / "latest").exists()
    assert sorted(p.name for p in here.iterdir()) == ["photo.png", "recon.png", "run"]
