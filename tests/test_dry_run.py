"""`--dry-run`: the plan of a run, from the run's own start-up code, with nothing written.

In-process (the library planner, or the command through Typer's CliRunner) and fast: the
demo recipe with the smallest model, and hand-made shard indexes and checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support import DEMO_RECIPE, SMALLEST_MODEL, cli, tiny_recipe

from cratemae.checkpoints import Resume, collect_rng_state, save_checkpoint
from cratemae.recipe import dump_recipe, recipe_hash
from cratemae.tasks.pretrain import build_mae, plan_pretrain
from cratemae.train.lock import RunLock
from cratemae.train.memory import (
    ERROR,
    MemoryEstimate,
    fake_model,
    measure_activations,
    state_bytes,
)


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under `roots` with its size and modification time."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


def _shards(root: Path, n: int, count: int) -> Path:
    """A `cratemae shard` directory of `n` (empty) tars whose shards.json records `count`
    samples each: the plan reads the counts, never the tars."""
    root.mkdir()
    entries = []
    for i in range(n):
        name = f"train-{i:06d}.tar"
        (root / name).touch()
        entries.append({"name": name, "samples": count})
    (root / "shards.json").write_text(json.dumps({"splits": {"train": entries}}))
    return root


def _checkpoint(run_dir: Path, recipe, step: int) -> Path:
    """A checkpoint the resume scan takes (complete, with the recipe it was saved under)."""
    meta = {"epoch": 1, "samples_seen": 0, "data_position": {"epoch": 1, "batch": 3},
            "recipe_hash": recipe_hash(recipe), "recipe_toml": dump_recipe(recipe),
            "end_of_epoch": False}
    return save_checkpoint(run_dir, step=step, model_state={"w": torch.zeros(2)},
                           model_config={}, optimizer_state={"state": {}, "param_groups": []},
                           scaler_state={}, rng_states=[collect_rng_state()], meta=meta)


def test_demo_plan_counts_steps_and_lr(tmp_path: Path) -> None:
    plan = plan_pretrain(tiny_recipe(), run_dir=tmp_path / "run", world=2, rank=1)
    assert plan.ok, plan.reasons
    d = plan.as_dict()
    assert d["data"]["train"] == {"shards": 500, "samples": 5000}
    # 5,000 samples over 2 ranks x batch 16: 156 batches per rank, 4,992 per epoch
    assert d["data"]["per_rank"] == 156 * 16 and d["data"]["samples_per_epoch"] == 4992
    assert d["schedule"]["steps"]["per_epoch"] == 156
    assert d["schedule"]["steps"]["total"] == 13 * 156
    assert d["schedule"]["lr"] == pytest.approx(3e-3 * 32 / 256)
    assert d["run_directory"]["resume_from"] is None
    assert d["model"]["parameters"]["trainable"] == sum(
        p.numel() for p in fake_model(lambda: build_mae(tiny_recipe())).parameters())


def test_1024_shards_with_recorded_counts_plan_in_well_under_a_second(tmp_path: Path) -> None:
    import time

    data = _shards(tmp_path / "in1k", 1024, 1251)
    recipe = tiny_recipe(f'data.train="{data}"', "data.batch_size=256", "data.num_workers=8")
    t0 = time.perf_counter()
    plan = plan_pretrain(recipe, run_dir=tmp_path / "run", world=8)
    seconds = time.perf_counter() - t0
    d = plan.as_dict()
    assert d["data"]["train"] == {"shards": 1024, "samples": 1024 * 1251}
    assert d["schedule"]["steps"]["per_epoch"] == 1024 * 1251 // (8 * 256)
    # the first shard is read (the others never are): these tars are empty
    assert plan.reasons == [f"data.train: {data / 'train-000000.tar'}: not one sample could "
                            "be read (shard unreadable: ReadError: empty file)"]
    assert seconds < 30  # a bound against a hang only: the test runs beside others


def test_a_held_lock_is_a_reason(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        plan = plan_pretrain(tiny_recipe(), run_dir=run)
    assert any("another run is writing into this directory" in r for r in plan.reasons)
    assert plan.as_dict()["run_directory"]["locked_by"].startswith("host ")


def test_resume_auto_names_the_checkpoint_and_a_refused_recipe_change(tmp_path: Path) -> None:
    run, recipe = tmp_path / "run", tiny_recipe()
    _checkpoint(run, recipe, step=7)
    newest = _checkpoint(run, recipe, step=9)
    plan = plan_pretrain(recipe, run_dir=run)
    assert plan.ok, plan.reasons
    assert plan.as_dict()["run_directory"]["resume_from"] == {
        "path": str(newest), "step": 9, "epoch": 1}
    changed = plan_pretrain(tiny_recipe("model.embed_dim=64"), run_dir=run)
    assert any("cannot change on resume" in r and "model.embed_dim" in r
               for r in changed.reasons), changed.reasons
    never = plan_pretrain(recipe, run_dir=run, resume=Resume("never"))
    assert any("--resume never" in r for r in never.reasons)


def test_every_reason_exit_2_and_nothing_written(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Three faults at once, all reported; neither the working folder, the run directory nor
    the cache (the demo set, the shard counts) gains or changes a file."""
    from cratemae.data.cache import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path / "cache"))  # no demo built yet
    run = tmp_path / "run"
    run.mkdir()
    cache = cache_dir()
    cache.mkdir()
    sets = [f"--set={s}" for s in SMALLEST_MODEL]
    with RunLock(run):
        snapshot = _tree(tmp_path, cache)
        bad = cli("pretrain", DEMO_RECIPE, *sets, "--set=model.mask_ratio=0.999",
                  "--set", 'data.train="missing/*.tar"', "--out", run, "--dry-run",
                  "--gpu-memory", "0.0001")
        assert _tree(tmp_path, cache) == snapshot
    assert bad.exit_code == 2, bad.output
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, bad.stderr
    assert any("mask_ratio" in e for e in errors)
    assert any("another run is writing" in e for e in errors)
    assert any("missing/*.tar" in e for e in errors)
    before = _tree(tmp_path, cache)
    good = cli("pretrain", DEMO_RECIPE, *sets, "--out", tmp_path / "fresh", "--dry-run",
               "--json", "--images-per-second", "1000")
    assert good.exit_code == 0, good.output
    result = json.loads(good.stdout)
    assert result["would_start"] and result["time"]["run_s"] > 0
    from cratemae.bench.speed import forward_flops  # the bench's own count

    config = fake_model(lambda: build_mae(tiny_recipe())).config
    assert result["model"]["gflop_per_image"] == forward_flops(config, mask_ratio=0.5) / 1e9
    assert _tree(tmp_path, cache) == before


def _cpu_peak(step) -> int:
    """Peak bytes allocated by torch on the CPU during `step()` (the profiler's allocation
    and free events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak


class _Stack(torch.nn.Module):
    """`depth` bias-free 8 x 8 linear maps: each saves its input (batch x 8 floats) and,
    but for the first (whose input needs no gradient), its weight (64 floats) for the
    backward; then x * (a view of x) saves x and its view, one storage (counted once)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8, bias=False)
                                          for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return (x * x.view_as(x)).sum()  # a view: a second tensor, the same storage


def test_activations_are_the_saved_bytes_per_image_and_fixed() -> None:
    """The quick twin of the real step below: exact figures for a model whose saved tensors
    are known, with and without checkpointing (the inputs of every block, then one block's
    input and weight again), and the largest batch that fits."""
    depth = 3
    acts = measure_activations(_Stack(depth), lambda m, b: m(torch.randn(b, 8)), "fp32")
    assert (acts.per_image, acts.fixed) == ((depth + 1) * 8 * 4, (depth - 1) * 64 * 4)
    assert (acts.per_image_ckpt, acts.fixed_ckpt) == ((depth + 2) * 8 * 4, 64 * 4)
    estimate = MemoryEstimate(*state_bytes(_Stack(depth), "adamw"), acts, 10, "fp32")
    assert estimate.state() == 4 * depth * 64 * 4  # weights, gradients, two moments
    assert estimate.total(False) == estimate.state() + (depth + 1) * 10 * 32 + (depth - 1) * 256
    assert estimate.largest_batch(estimate.total(False), False) == 10
    assert estimate.largest_batch(estimate.total(False) - 1, False) == 9


@pytest.mark.slow  # a training step; its quick twin is the test above
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_holds_a_real_cpu_step(checkpointing: bool) -> None:
    """A training step (forward, backward, AdamW) of a small model on the CPU peaks within
    ERROR of the estimate, with and without gradient checkpointing."""
    from cratemae.train.optim import configure_optimizers, param_groups

    recipe = tiny_recipe("model.embed_dim=64", "model.decoder_embed_dim=64", "model.depth=2",
                         "data.batch_size=24")
    torch.manual_seed(0)
    model = build_mae(recipe)
    model.set_grad_checkpointing(checkpointing)

    def forward(m, batch):
        imgs = torch.randn(batch, 3, 32, 32)
        return m(imgs, mask_ratio=0.5, noise=torch.rand(batch, m.config.num_patches)).loss

    fake = fake_model(lambda: build_mae(recipe))  # as the planner measures
    fake.set_grad_checkpointing(checkpointing)
    estimate = MemoryEstimate(*state_bytes(model, "adamw"),
                              measure_activations(fake, forward, "fp32"), 24, "fp32")
    optimizer = configure_optimizers(model, recipe.optim, 1e-3, param_groups(model, 0.05))

    def step() -> None:
        forward(model, 24).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's moments exist from here on, as in every later step
    real = estimate.weights + estimate.optimizer + _cpu_peak(step)
    assert abs(real / estimate.total(checkpointing) - 1) < ERROR
    assert estimate.total(True) < 0.8 * estimate.total(False)
    fits = estimate.largest_batch(estimate.total(checkpointing), checkpointing)
    assert fits in (24, 25)


def _pretrained(where: Path) -> Path:
    """A run with one checkpoint of a 1-layer model (32 px, patch 8), as pretrain saves it."""
    from cratemae.model import create_model

    torch.manual_seed(0)
    mae = create_model("crate_mae_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1,
                       num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    where.mkdir(parents=True)
    recipe = '[data]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n'
    (where / "recipe.toml").write_text(recipe)
    meta = {"epoch": 0, "samples_seen": 0, "recipe_hash": "x", "end_of_epoch": False,
            "data_position": {"epoch": 0, "batch": 1}, "recipe_toml": recipe}
    return save_checkpoint(where, step=1, model_state=mae.state_dict(),
                           model_config=mae.config.to_dict(), optimizer_state={},
                           scaler_state={}, rng_states=[collect_rng_state()], meta=meta)


def test_finetune_and_probe_plan_from_the_checkpoint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _pretrained(tmp_path / "runs" / "demo")
    before = _tree(tmp_path)
    ft = cli("finetune", "finetune/demo", "--checkpoint", "runs/demo", "--dry-run", "--json")
    assert ft.exit_code == 0, ft.output
    plan = json.loads(ft.stdout)
    assert plan["run_directory"]["path"] == "runs/demo-finetune"
    assert plan["schedule"]["steps"]["per_epoch"] == 5000 // 64
    assert plan["memory"]["peak_bytes"] > 0
    mae = cli("probe", "probe/demo", "--checkpoint", "runs/demo", "--dry-run", "--json",
              "--set", 'probe.protocol="mae"', "--set", "probe.layer=5")
    assert mae.exit_code == 2 and "probe.layer = 5" in mae.stderr, mae.output
    mae = cli("probe", "probe/demo", "--checkpoint", "runs/demo", "--dry-run", "--json",
              "--set", 'probe.protocol="mae"')
    assert mae.exit_code == 0, mae.output
    plan = json.loads(mae.stdout)
    assert plan["model"]["parameters"] == {"trainable": 32 * 10 + 10, "frozen": 9504}
    # the frozen encoder keeps nothing for the backward, checkpointed or not
    assert plan["memory"]["activations_checkpointed_bytes"] <= plan["memory"][
        "activations_bytes"]
    assert _tree(tmp_path) == before


def test_probe_of_embeddings_files_plans_without_a_checkpoint(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """`probe --features TRAIN VAL --dry-run` reads the files' headers and metadata as the
    probe would: a pair that belongs together plans (no image decoded, no model built), one
    that does not is the run's own reason, and nothing is written either way."""
    from test_trust_embed_reader import write_st

    monkeypatch.chdir(tmp_path)
    train, val = write_st(tmp_path / "train.st"), write_st(tmp_path / "val.st")
    other = write_st(tmp_path / "other.st", classes=["n01440764", "n01443537"])
    before = _tree(tmp_path)
    ok = cli("probe", "probe/demo", "--features", str(train), str(val), "--dry-run", "--json")
    assert ok.exit_code == 0, ok.output
    plan = json.loads(ok.stdout)
    assert plan["data"]["features"] == [str(train), str(val)]
    assert "model" not in plan or not plan["model"].get("parameters")
    for files, reason in [((train, other), "name their classes differently"),
                          ((train, train), "given as both TRAIN and VAL")]:
        bad = cli("probe", "probe/demo", "--features", *map(str, files), "--dry-run")
        assert bad.exit_code == 2 and reason in bad.stderr, bad.output
    assert _tree(tmp_path) == before


def test_the_time_and_the_data_workers_come_from_the_recorded_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --images-per-second the plan takes the rate `cratemae bench` recorded for the
    model on this device, and says how many data workers feed it at the per-worker figure
    `cratemae bench-data` recorded for the recipe's data; with neither, it says what to run."""
    from cratemae.bench.data import data_key, model_key, record_rate
    from cratemae.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path / "cache"))  # none recorded yet
    before = cli("pretrain", "demo", "--dry-run")
    assert before.exit_code == 0 and "--images-per-second" in before.stdout, before.output
    recipe = load_recipe("demo")
    assert record_rate(model_key(recipe.model.name, 32), 700.0)
    assert record_rate(data_key(recipe.data, 32, "pretrain"), 300.0)
    snapshot = _tree(tmp_path)
    res = cli("pretrain", "demo", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    time = json.loads(res.stdout)["time"]
    assert time["data_workers"] == 3  # ceil(700 / 300)
    assert time["per_epoch_s"] == pytest.approx(5000 // 64 * 64 / 700.0)
    assert json.loads(cli("pretrain", "demo", "--dry-run", "--json", "--images-per-second",
                          "200").stdout)["time"]["data_workers"] == 1
    from cratemae.train.plan_time import Rates

    def texts(images_per_second, rates):
        plan = plan_pretrain(recipe, run_dir=tmp_path / "run",
                             images_per_second=images_per_second, rates=rates)
        return {key: text for key, _, text in plan.sections["Time"]}

    rates = Rates(model=lambda name, size: 700.0 if (name, size) == ("crate_mae_tiny", 32)
                  else None, data=lambda data, size, task: 300.0 if task == "pretrain" else None)
    said = texts(None, rates)
    assert "bench`'s figure for crate_mae_tiny at 32 px" in said["per_epoch_s"]
    assert said["data_workers"].endswith("the recipe has 0: the accelerator would wait on data; "
                                         'data.num_workers = 3, or data.decode = "gpu"')
    assert texts(200.0, rates)["data_workers"].endswith("the recipe has 0")
    assert "cratemae bench-data" in texts(200.0, None)["data_workers"]
    assert _tree(tmp_path) == snapshot


@pytest.mark.parametrize("args", [
    ["--images-per-second", "nan"], ["--images-per-second", "0"], ["--images-per-second", "-1"],
    ["--images-per-second", "inf"], ["--images-per-second", "1e-320"],
    ["--images-per-second", "1e308"], ["--gpu-memory", "nan"], ["--gpu-memory", "-1"]],
    ids=" ".join)
def test_the_plans_figures_out_of_range_are_one_error_line(args: list[str]) -> None:
    res = cli("pretrain", "demo", "--dry-run", *args)
    assert res.exit_code == 2 and f"{args[0]} {float(args[1]):g}: must be a number " \
        in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
