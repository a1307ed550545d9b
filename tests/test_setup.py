"""What every task shares before it trains: `--resume` parsed once, the run set-up, the
device, the model section derived from the model's configuration, and the bad-data verdict
agreed by all ranks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from data_fixtures import shards_with_bad

from cratemae.checkpoints import Resume, find_resume
from cratemae.distributed import dist
from cratemae.distributed.device import choose_device
from cratemae.errors import BadInputError
from cratemae.model import CrateMAEConfig
from cratemae.recipe import ModelSection, Recipe, load_recipe
from cratemae.train.setup import RunSetup

REPO = Path(__file__).resolve().parents[1]


# --- --resume, parsed once ------------------------------------------------------------------
def test_resume_parses_words_and_existing_paths_once(tmp_path: Path) -> None:
    assert Resume.parse("auto") == Resume("auto")
    assert Resume.parse("never") == Resume("never")
    assert Resume.parse(tmp_path) == Resume("path", tmp_path)
    parsed = Resume.parse("auto")
    assert Resume.parse(parsed) is parsed  # a parsed value passes through untouched
    with pytest.raises(BadInputError, match=r"--resume .*nope: no such checkpoint"):
        Resume.parse(tmp_path / "nope")


def test_resume_never_into_an_empty_directory_starts_fresh(tmp_path: Path) -> None:
    assert find_resume(tmp_path / "new", Resume.parse("never")) is None
    assert find_resume(tmp_path / "new", "auto") is None


# --- the run set-up ---------------------------------------------------------------------------
def test_run_setup_writes_nothing_until_the_run_directory_is_opened(tmp_path: Path) -> None:
    recipe = Recipe()
    run_dir = tmp_path / "run"
    with RunSetup(recipe, run_dir, resume="auto") as run:
        assert run.resume_from is None and run.main_process
        assert not run_dir.exists()  # bad input found now leaves nothing behind
        with run.open_run_dir() as opened:
            assert opened == run_dir
            assert load_recipe(run_dir / "recipe.toml") == recipe
            assert (run_dir / "log.txt").is_file()


def test_run_setup_seeds_per_rank_only_when_asked(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo.toml", ["run.seed=5"])
    with RunSetup(recipe, tmp_path, resume=None):
        shared = torch.rand(3)
    with RunSetup(recipe, tmp_path, resume=None, seed_per_rank=True):
        per_rank = torch.rand(3)  # rank 0 of one process: seed 5 + 0
    torch.manual_seed(5)
    assert torch.equal(shared, torch.rand(3)) and torch.equal(per_rank, shared)


def test_run_setup_ends_the_launch_when_resume_is_bad(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(BadInputError), RunSetup(Recipe(), tmp_path, resume=tmp_path / "x"):
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


# --- the model section is the model's configuration --------------------------------------------
def test_model_section_keys_are_the_configuration_fields() -> None:
    fields = [f.name for f in dataclasses.fields(CrateMAEConfig)]
    assert list(ModelSection.model_fields) == ["name", *fields, "mask_ratio"]


@pytest.mark.parametrize(("key", "value"), [("depth", 0), ("patch_size", -2),
                                            ("ista_step_size", 0.0), ("ista_lambda", -0.1)])
def test_model_section_bounds_come_from_the_configuration(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        CrateMAEConfig(**{key: value})
    with pytest.raises(ValueError, match=f"model.{key}"):
        Recipe.model_validate({"model": {key: value}})


def test_configuration_refuses_non_finite_values() -> None:
    with pytest.raises(ValueError, match="ista_lambda must be finite"):
        CrateMAEConfig(ista_lambda=float("inf"))


# --- bad data: one verdict, agreed by every rank ----------------------------------------------
def test_raise_together_raises_this_ranks_error_or_none() -> None:
    dist.raise_together(None, "elsewhere")  # nothing wrong anywhere: no error
    with pytest.raises(BadInputError, match=r"^mine$"):
        dist.raise_together(BadInputError("mine"), "elsewhere")


def test_pretraining_over_mostly_bad_data_stops_in_one_line(tmp_path: Path) -> None:
    from cratemae.tasks.pretrain import pretrain

    root, _ = shards_with_bad(tmp_path / "data", [48, 48], set(range(0, 96, 2)), size=32)
    recipe = load_recipe(REPO / "recipes" / "demo.toml", [
        f"data.train='{root}'", "data.num_workers=0", "data.batch_size=16",
        "model.embed_dim=32", "model.decoder_embed_dim=32", "model.depth=1",
        "model.decoder_depth=1", "model.num_heads=2", "model.decoder_num_heads=2",
        "schedule.epochs=3", "run.checkpoint_every_minutes=1000"])
    with pytest.raises(BadInputError, match=r"of 96 samples were bad \(50\.0% > "):
        pretrain(recipe, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing saved past bad data


def test_a_change_of_data_workers_is_not_safe_on_resume() -> None:
    """Each worker reads its own stream of the epoch: another count reads the samples in
    another order, so resuming with it would not repeat the run."""
    from cratemae.recipe import unsafe_changes

    base = load_recipe(REPO / "recipes" / "demo.toml", ["data.num_workers=2"])
    other = load_recipe(REPO / "recipes" / "demo.toml", ["data.num_workers=3"])
    assert unsafe_changes(base, other) == ["data.num_workers"]
    later = load_recipe(REPO / "recipes" / "demo.toml", ["data.num_workers=2",
                                                        "schedule.epochs=99"])
    assert unsafe_changes(base, later) == []


def test_fine_tuning_applies_the_recipes_drop_path_rate() -> None:
    from cratemae.model import CrateEncoder
    from cratemae.model.layers import DropPath
    from cratemae.tasks.finetune import FinetuneTask

    recipe = load_recipe(REPO / "recipes" / "finetune" / "demo.toml",
                         ["finetune.drop_path_rate=0.2", "finetune.mixup=0", "finetune.cutmix=0"])
    encoder = CrateEncoder(CrateMAEConfig(img_size=16, patch_size=8, embed_dim=8, depth=3,
                                          num_heads=2, decoder_embed_dim=8, decoder_depth=1,
                                          decoder_num_heads=2))
    FinetuneTask(recipe, encoder, encoder.config.to_dict(), num_classes=4)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0
             for b in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])  # rising to the recipe's rate
    assert load_recipe(REPO / "recipes" / "finetune" / "in1k.toml").finetune.drop_path_rate == 0.1


def test_an_error_that_is_not_a_lost_peer_passes_through_the_collective_guard() -> None:
    with pytest.raises(RuntimeError, match=r"^shapes do not match$"), dist.collective("a step"):
        raise RuntimeError("shapes do not match")  # a bug stays a bug, with its traceback
