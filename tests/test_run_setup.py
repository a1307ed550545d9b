"""What every task shares before it trains: the run set-up (the run directory, the seeds, the
launch ended on bad input) and the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import DEMO_RECIPE

from cratemae.checkpoints import Resume
from cratemae.distributed import dist
from cratemae.distributed.device import choose_device
from cratemae.errors import BadInputError
from cratemae.recipe import Recipe, load_recipe
from cratemae.train.setup import RunSetup


# --- the run set-up ---------------------------------------------------------------------------
def test_run_setup_writes_nothing_until_the_run_directory_is_opened(tmp_path: Path) -> None:
    recipe = Recipe()
    run_dir = tmp_path / "run"
    with RunSetup(recipe, run_dir, resume=Resume.AUTO) as run:
        assert run.resume_from is None and dist.is_main_process()
        assert not run_dir.exists()  # bad input found now leaves nothing behind
        with run.open_run_dir() as opened:
            assert opened == run_dir
            assert load_recipe(run_dir / "recipe.toml") == recipe
            assert (run_dir / "log.txt").is_file()


def test_run_setup_seeds_per_rank_only_when_asked(tmp_path: Path) -> None:
    recipe = load_recipe(DEMO_RECIPE, ["run.seed=5"])
    with RunSetup(recipe, tmp_path, resume=None):
        shared = torch.rand(3)
    with RunSetup(recipe, tmp_path, resume=None, seed_per_rank=True):
        per_rank = torch.rand(3)  # rank 0 of one process: seed 5 + 0
    torch.manual_seed(5)
    assert torch.equal(shared, torch.rand(3)) and torch.equal(per_rank, shared)


def test_run_setup_ends_the_launch_when_resume_is_bad(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    bad = Resume("path", tmp_path / "x")  # vanished since it was parsed
    with pytest.raises(BadInputError), RunSetup(Recipe(), tmp_path, resume=bad):
        pass
    assert dist.get_dist_info().world_size == 1


# --- the device -------------------------------------------------------------------------------
def test_choose_device_names_the_option_and_what_is_here() -> None:
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BadInputError, match=r"^--device tpu: expected auto, cpu, cuda or cuda:N$"):
        choose_device("tpu")
    with pytest.raises(BadInputError, match=r"^--device cuda:x: expected"):
        choose_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA GPU is available here; use --device cpu"):
            choose_device("cuda")
