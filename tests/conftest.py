"""Fixtures shared by every test module: an isolated demo-data cache and a small model
pre-trained on the demo data (for the commands that read checkpoints). Plain helpers (the
repository path, a tiny recipe, the CLI runner, the two-rank launch) are in support.py."""

from __future__ import annotations

import fcntl
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


def _weight(item: pytest.Item) -> float:
    """Rough seconds, for dealing the tests out to the workers: `longest(MINUTES)`'s, else
    20 for a slow test and 0.2 for the others."""
    if (longest := item.get_closest_marker("longest")) is not None:
        return 60.0 * float(longest.args[0] if longest.args else 2)
    return 20.0 if item.get_closest_marker("slow") else 0.2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the tests for pytest-xdist's `--dist worksteal` (pyproject.toml), which gives
    worker i the next `remaining // (workers - i)` tests in this order and later lets an idle
    worker take the back half of a busy one's queue. The slow tests are dealt out first, the
    heaviest to the lightest share (by marker: `longest`, then `slow`), so that each worker
    starts on its share of them at once, and the quick tests fill the shares up to their
    sizes behind them: the ones an idle worker takes over. In one process: the same order
    for one share (the longest first)."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    sizes, left = [], len(items)
    for i in range(workers):  # as worksteal splits the collection
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    heavy = sorted((t for t in items if _weight(t) > 1), key=_weight, reverse=True)  # stable
    quick = [t for t in items if _weight(t) <= 1]
    shares: list[list[pytest.Item]] = [[] for _ in sizes]
    load = [0.0] * len(sizes)
    for item in heavy:
        i = min((j for j in range(len(sizes)) if len(shares[j]) < sizes[j]),
                key=lambda j: load[j])
        shares[i].append(item)
        load[i] += _weight(item)
    for share, size in zip(shares, sizes, strict=True):
        need = size - len(share)
        share.extend(quick[:need])
        quick = quick[need:]
    assert not quick and sum(map(len, shares)) == len(items)
    items[:] = [t for share in shares for t in share]


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory of the tiny demo model after 150 steps (about 15 s on 2 cores),
    trained once per session: under pytest-xdist the first worker to ask trains it, under a
    lock, and the others read it (no test writes into it)."""
    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import pretrain

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the session's folder, shared by its workers
    made = root / "demo-run.checkpoint"  # the checkpoint's path, once trained
    with open(root / "demo-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not made.exists():
            recipe = load_recipe(DEMO_RECIPE, [*TINY_MODEL, "schedule.max_steps=150",
                                               "run.log_every=50"])
            result = pretrain(recipe, run_dir=root / "demo-run")
            assert result.last_checkpoint is not None
            made.write_text(str(result.last_checkpoint))
    return Path(made.read_text())


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
