"""The pre-training engine on the built-in demo data: run directory, exact resume,
preemption, non-finite steps, corrupt samples counted, bad input, two processes (more on
resume in tests/test_resume.py)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import image_tree, shards_with_bad
from support import REPO, tiny_recipe, wait_for_steps

from cratemae.checkpoints import Resume, load_checkpoint
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import MAETask, pretrain
from cratemae.train.trainer import Preempted

DEMO = REPO / "recipes" / "demo.toml"
# A smaller model than the demo recipe's, so that each run takes seconds.
TINY = [
    "model.embed_dim=64", "model.decoder_embed_dim=64", "model.depth=2", "model.decoder_depth=1",
    "data.batch_size=32", "schedule.max_steps=8", "schedule.warmup_epochs=0.05",
    "run.log_every=1",
]
METRIC_FIELDS = {"step", "epoch", "loss", "lr", "images_per_s", "data_wait_fraction",
                 "max_memory_gb", "bad_samples"}


def recipe(*sets: str):
    return load_recipe(DEMO, [*TINY, *sets])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratemae", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=REPO, **kw)


def test_run_directory_holds_recipe_metrics_log_and_checkpoint(tmp_path):
    result = pretrain(recipe(), run_dir=tmp_path)
    assert (tmp_path / "recipe.toml").is_file()
    assert load_recipe(tmp_path / "recipe.toml") == recipe()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r.keys() >= METRIC_FIELDS for r in records)
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in records)
    assert "step 8/8" in (tmp_path / "log.txt").read_text()
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.meta["step"] == 8 and ckpt.meta["samples_seen"] == 8 * 32
    assert result.final_loss == records[-1]["loss"]


@pytest.mark.slow  # ~5 s; quick: test_optim's exact lr_at values and the warm-up warning
def test_learning_rate_warms_up_per_step_then_follows_a_half_cosine(tmp_path):
    # Batch 64: 78 steps per epoch; 2 epochs capped at 60 steps; warm-up 0.5 epoch = 39 steps.
    lrs = []
    pretrain(load_recipe(DEMO, [*TINY[:4], "schedule.epochs=2", "schedule.max_steps=60",
                                "schedule.warmup_epochs=0.5", "optim.base_lr=1.5e-3",
                                "run.log_every=1"]),
             run_dir=tmp_path, on_log=lambda r: lrs.append(r["lr"]))
    peak = 1.5e-3 * 64 / 256
    assert len(lrs) == 60
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak / 39, rel=1e-9)
    assert lrs[39] == pytest.approx(peak, rel=1e-9)
    assert all(a < b for a, b in itertools.pairwise(lrs[:40]))
    assert all(a > b for a, b in itertools.pairwise(lrs[39:]))
    # half-cosine: halfway through the decay the lr is half the peak
    assert lrs[39 + 21 // 2] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 10 / 21)))


def test_resume_after_signal_repeats_the_uninterrupted_run_exactly(tmp_path):
    whole = pretrain(recipe(), run_dir=tmp_path / "whole")

    def stop_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted) as stopped:
        pretrain(recipe(), run_dir=tmp_path / "split", on_log=stop_at_3)
    assert stopped.value.exit_code == EXIT_REQUEUE
    first = metrics(tmp_path / "split")
    assert first[-1]["step"] == 3  # acted on at the end of the step it arrived in
    resumed = pretrain(recipe(), run_dir=tmp_path / "split")
    assert resumed.state.step == 8
    losses_whole = [r["loss"] for r in metrics(tmp_path / "whole")]
    losses_split = [r["loss"] for r in metrics(tmp_path / "split")]
    assert losses_split == losses_whole  # bit for bit: data order, masks, optimizer, RNG
    a = load_checkpoint(whole.last_checkpoint).model_state
    b = load_checkpoint(resumed.last_checkpoint).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_epoch_after_crash_drops_metrics_logged_after_the_checkpoint(tmp_path):
    pretrain(recipe("run.checkpoint_every_steps=3", "schedule.max_steps=5"), run_dir=tmp_path)
    # Simulate a crash after step 5 that lost checkpoint 5: resume from step 3.
    ckpts = tmp_path / "checkpoints"
    resumed = pretrain(recipe(), run_dir=tmp_path,
                       resume=Resume.parse(str(ckpts / "step-000000003")))
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps == list(range(1, 9))
    assert resumed.state.samples_seen == 8 * 32


def test_metrics_count_every_corrupt_sample_the_run_read(tmp_path):
    # 40 samples of 12 px, 7 of them corrupt; batches of 8: one epoch is 5 steps and reads all.
    data, corrupt = shards_with_bad(tmp_path / "data", [24, 16], {0, 3, 9, 10, 23, 24, 39})
    result = pretrain(recipe(f'data.train="{data}"', "model.img_size=16", "data.batch_size=8",
                             "data.shuffle_buffer=8", "data.max_bad_fraction=0.5",
                             "schedule.max_steps=5"), run_dir=tmp_path / "run")
    counts = [r["bad_samples"] for r in metrics(tmp_path / "run")]
    assert len(counts) == 5 and counts == sorted(counts)  # a running total, logged every step
    assert counts[-1] == corrupt == 7
    assert load_checkpoint(result.last_checkpoint).meta["bad_samples"] == corrupt


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    real = MAETask.loss

    def sometimes_nan(self, model, batch, micro):
        loss = real(self, model, batch, micro)
        return loss * float("nan") if micro in (2, 5) else loss

    monkeypatch.setattr(MAETask, "loss", sometimes_nan)
    result = pretrain(recipe(), run_dir=tmp_path)
    records = metrics(tmp_path)
    assert records[-1]["nonfinite_skipped"] == 2
    # NaN windows, written as null and named (strict JSON)
    assert [r["step"] for r in records if "loss" in r.get("nonfinite", [])] == [3, 6]
    assert all(r["loss"] is None for r in records if "loss" in r.get("nonfinite", []))
    weights = load_checkpoint(result.last_checkpoint).model_state
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_too_many_nonfinite_losses_stop_the_run_keeping_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    real = MAETask.loss

    def nan_from_4(self, model, batch, micro):
        loss = real(self, model, batch, micro)
        return loss * float("nan") if micro >= 4 else loss

    monkeypatch.setattr(MAETask, "loss", nan_from_4)
    with pytest.raises(CrateMAEError, match="3 non-finite losses in a row") as err:
        pretrain(recipe("run.max_nonfinite=3", "run.checkpoint_every_steps=2"), run_dir=tmp_path)
    assert err.value.exit_code == 1
    assert "step-000000004" in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000000004").meta["step"] == 4


def test_resume_refuses_an_unsafe_recipe_change_and_allows_a_safe_one(tmp_path):
    pretrain(recipe("schedule.max_steps=2"), run_dir=tmp_path)
    with pytest.raises(BadInputError, match=r"optim\.base_lr"):
        pretrain(recipe("schedule.max_steps=4", "optim.base_lr=1e-2"), run_dir=tmp_path)
    result = pretrain(recipe("schedule.max_steps=4", "run.log_every=2"), run_dir=tmp_path)
    assert result.state.step == 4


def test_resume_never_refuses_to_mix_a_new_run_into_an_old_one(tmp_path):
    pretrain(recipe("schedule.max_steps=2"), run_dir=tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(BadInputError, match="already holds checkpoints"):
        pretrain(recipe("schedule.max_steps=2"), run_dir=tmp_path, resume=Resume.parse("never"))
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_gradient_accumulation_counts_micro_batches_and_scales_the_lr(tmp_path, caplog):
    caplog.set_level("INFO", logger="cratemae")
    result = pretrain(recipe("optim.accum_steps=2", "schedule.max_steps=3"), run_dir=tmp_path)
    assert result.state.batch == 6 and result.state.samples_seen == 6 * 32
    assert "effective batch 64" in caplog.text


@pytest.mark.slow  # three subprocesses, ~11 s; quick: test_cli's and test_recipe_hostile's
def test_cli_exit_codes_json_and_plain_lines(tmp_path):
    out = tmp_path / "run"
    ok = cli("pretrain", str(DEMO), *[f"--set={s}" for s in TINY], "--set",
             "schedule.max_steps=2", "--out", str(out), "--json")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["last_checkpoint"]).is_dir()
    assert "step 2/2" in ok.stderr  # plain log lines when not on a terminal
    assert "\x1b[" not in ok.stderr

    bad = cli("pretrain", str(DEMO), "--set", "optim.bogus=1", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "optim.bogus" in bad.stderr

    (out / "checkpoints" / "step-000000002" / "model.safetensors").write_bytes(b"junk")
    corrupt = cli("pretrain", str(DEMO), *[f"--set={s}" for s in TINY], "--out", str(out),
                  "--resume", str(out / "checkpoints" / "step-000000002"))
    assert corrupt.returncode == 2
    assert "model.safetensors" in corrupt.stderr and "Traceback" not in corrupt.stderr


@pytest.mark.slow  # a subprocess trains, stops and resumes: ~11 s (quick: test_preemption)
def test_sigterm_saves_exits_3_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", str(DEMO), *[f"--set={s}" for s in TINY], "--set",
            "schedule.max_steps=400", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "cratemae", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, [proc], 2, timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert "requeue" in err.lower() or "resume" in err.lower()
    stopped_at = load_checkpoint(out / "checkpoints" / (out / "checkpoints" / "latest")
                                 .read_text().strip()).meta["step"]
    assert 2 <= stopped_at < 400
    again = cli(*args[:-4], "--set", f"schedule.max_steps={stopped_at + 2}", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert f"resumed from {out / 'checkpoints'}" in again.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped_at + 3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(launcher: str, rank: int, port: int) -> dict[str, str]:
    if launcher == "torchrun":
        return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # srun with one task per process: rank and rendezvous from SLURM's variables alone
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)}


@pytest.mark.slow  # two processes of seconds each; the quick suite's twins: test_dist.py's
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])  # gloo collectives, both launchers
def test_two_processes_gloo_split_the_data_and_only_rank_0_writes(tmp_path, launcher):
    out = tmp_path / "ddp"
    port = 20000 + _free_port() % 20000
    args = ["pretrain", str(DEMO), *[f"--set={s}" for s in TINY], "--set",
            "schedule.max_steps=4", "--out", str(out), "--json"]
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    procs = [subprocess.Popen([sys.executable, "-m", "cratemae", *args], cwd=REPO,
                              env={**clean, **_launch_env(launcher, rank, port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1] + results[1][1]
    ckpt = load_checkpoint(out / "checkpoints" / "step-000000004")
    assert ckpt.meta["world_size"] == 2
    assert ckpt.meta["samples_seen"] == 4 * 32 * 2
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and "effective batch 64" in log
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # one line per step, from rank 0
    assert results[1][0] == ""  # only rank 0 prints the summary
    assert "step 4/4" in results[0][1] and "step 4/4" not in results[1][1]  # and log lines


@pytest.mark.slow
def test_compiled_run_matches_eager_and_its_checkpoints_load_both_ways(tmp_path):
    """run.compile = true: same losses as eager to 1e-4 relative (float32 CPU, inductor may
    reorder sums), checkpoints without wrapper prefixes, resumable without compiling."""
    eager = pretrain(recipe("schedule.max_steps=4"), run_dir=tmp_path / "eager")
    compiled = pretrain(recipe("schedule.max_steps=4", "run.compile=true"),
                        run_dir=tmp_path / "compiled")
    a = [r["loss"] for r in metrics(tmp_path / "eager")]
    b = [r["loss"] for r in metrics(tmp_path / "compiled")]
    assert b == pytest.approx(a, rel=1e-4)
    weights = load_checkpoint(compiled.last_checkpoint).model_state
    assert weights.keys() == load_checkpoint(eager.last_checkpoint).model_state.keys()
    resumed = pretrain(recipe("schedule.max_steps=6"), run_dir=tmp_path / "compiled")
    assert resumed.state.step == 6
    again = pretrain(recipe("schedule.max_steps=8", "run.compile=true"),
                     run_dir=tmp_path / "compiled")
    assert again.state.step == 8


def test_a_run_shorter_than_its_warm_up_warns_once(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cratemae")
    pretrain(tiny_recipe("schedule.max_steps=2"), run_dir=tmp_path / "a")
    warned = [r for r in caplog.records if "never reaches its peak" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    # the demo: 5,000 images / batch 16 = 312 steps per epoch, warm-up 1 epoch
    assert "the run is 2 steps, shorter than its 312 warm-up steps" in warned[0].getMessage()
    caplog.clear()
    pretrain(tiny_recipe("schedule.max_steps=2", "schedule.warmup_epochs=0"),
             run_dir=tmp_path / "b")
    assert "never reaches its peak" not in caplog.text


def test_a_run_resolves_its_data_once_and_builds_one_loader_per_epoch(tmp_path, monkeypatch):
    import cratemae.data.loader as loader_module

    counts = {"resolve": 0, "loader": 0}
    resolve, init = loader_module.resolve_source, loader_module.Loader.__init__

    def counting_resolve(*args, **kwargs):
        counts["resolve"] += 1
        return resolve(*args, **kwargs)

    def counting_init(self, *args, **kwargs):
        counts["loader"] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(loader_module, "resolve_source", counting_resolve)
    monkeypatch.setattr(loader_module.Loader, "__init__", counting_init)
    # 24 images in batches of 4: 6 steps an epoch, 3 epochs.
    data = image_tree(tmp_path / "images", ["a", "b", "c"], per_class=8)
    result = pretrain(recipe(f'data.train="{data}"', "data.batch_size=4", "data.num_workers=0",
                             "schedule.epochs=3", "schedule.max_steps=99", "run.log_every=6"),
                      run_dir=tmp_path / "run")
    assert (result.state.epoch, result.state.step, result.total_steps) == (3, 18, 18)
    assert counts == {"resolve": 1, "loader": 3}
