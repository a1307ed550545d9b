"""Fixtures shared by every test module: an isolated demo-data cache and a small model
pre-trained on the demo data (for the commands that read checkpoints). Plain helpers (the
repository path, a tiny recipe, the CLI runner, the two-rank launch) are in support.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import DEMO_RECIPE, TINY_MODEL


def pytest_configure(config: pytest.Config) -> None:
    # Never touch the user's ~/.cache; subprocesses inherit the variable.
    if "CRATEMAE_TEST_CACHE" not in os.environ:
        base = Path(config.rootpath) / ".pytest-cache-data"
        os.environ["CRATEMAE_TEST_CACHE"] = str(base)
    os.environ["CRATEMAE_CACHE"] = os.environ["CRATEMAE_TEST_CACHE"]
    # Under pytest-xdist each worker gets its share of the CPUs for torch's threads (and its
    # subprocesses', through the variable): two workers each spinning two OpenMP threads on
    # two cores run several times slower than one.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, then the other slow ones: started at once, they run beside
    the many short tests (which pytest-xdist's workers share at the end) instead of last.
    pytest-xdist's `--dist load` (pyproject.toml) deals the first quarter of this order to
    the workers in turn and the rest as they free up, so the longest ones start together on
    different workers (`--dist worksteal` gives the first worker the first half: every slow
    test, one after another)."""
    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("longest") else 1 if item.get_closest_marker(
            "slow") else 2

    items.sort(key=rank)  # stable: files and tests keep their order within each rank


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory of the tiny demo model after 150 steps (about 15 s on 2 cores)."""
    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import pretrain

    recipe = load_recipe(DEMO_RECIPE, [*TINY_MODEL, "schedule.max_steps=150",
                                       "run.log_every=50"])
    result = pretrain(recipe, run_dir=tmp_path_factory.mktemp("demo-run"))
    assert result.last_checkpoint is not None
    return result.last_checkpoint


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the demo data set and shard counts of this session out of the user's ~/.cache
    (subprocesses inherit the variable): built once per session under pytest's base temp."""
    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path_factory.getbasetemp() / "cratemae-cache"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two of scikit-image's photographs as files: astronaut.png and coffee.jpg."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    return [folder / "astronaut.png", folder / "coffee.jpg"]
