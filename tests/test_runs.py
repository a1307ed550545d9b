"""`cratemae runs`: kind, progress, last figures and state of each run under a folder; and
what a finished run says when it is run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO, SMALLEST_MODEL

from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import pretrain
from cratemae.train.runs import LIVE_SECONDS, describe_run

DEMO = REPO / "recipes" / "demo.toml"
TINY = [
    *SMALLEST_MODEL, "data.batch_size=32",
    "schedule.max_steps=3", "schedule.warmup_epochs=0.05", "run.log_every=1",
    "run.checkpoint_every_steps=1", "run.loggers=[]",
]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratemae", *args], capture_output=True,
                          text=True, cwd=REPO, env=os.environ.copy())


def stop_at(step: int, error: BaseException, seen: list | None = None):
    """An on_log callback that raises `error` at `step` (after describing the live run)."""
    def on_log(record: dict) -> None:
        if record["step"] == step:
            if seen is not None:
                seen.append(describe_run(Path(seen.pop(0))))
            raise error
    return on_log


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "finished"
    pretrain(load_recipe(DEMO, TINY), run_dir=run)
    return run


def test_a_finished_pretraining(finished):
    info = describe_run(finished)
    assert (info.kind, info.model, info.state) == ("pre-train", "crate_mae_tiny", "finished")
    assert (info.step, info.total_steps) == (3, 3)
    last = json.loads((finished / "metrics.jsonl").read_text().splitlines()[-1])
    assert info.loss == last["loss"]
    assert info.last_checkpoint.endswith("step-000000003")


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_final_loss(finished):
    before = (finished / "metrics.jsonl").read_text()
    again = pretrain(load_recipe(DEMO, TINY), run_dir=finished)
    assert again.finished_before and again.history == []
    assert again.final_loss == json.loads(before.splitlines()[-1])["loss"]
    assert (finished / "metrics.jsonl").read_text() == before
    assert describe_run(finished).state == "finished"


def test_a_running_then_stopped_run_is_resumable(tmp_path):
    seen: list = [str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        pretrain(load_recipe(DEMO, TINY), run_dir=tmp_path,
                 on_log=stop_at(2, KeyboardInterrupt(), seen))
    (live,) = seen
    assert live.state == "running" and f"pid {os.getpid()} since" in live.detail  # the lock
    info = describe_run(tmp_path)
    assert info.state == "stopped" and "resumable from step 1" in info.detail
    assert info.last_checkpoint.endswith("step-000000001")


def test_a_failed_run_says_why(tmp_path):
    with pytest.raises(RuntimeError):
        pretrain(load_recipe(DEMO, TINY), run_dir=tmp_path,
                 on_log=stop_at(2, RuntimeError("the disk is on fire")))
    info = describe_run(tmp_path)
    assert info.state == "failed" and "the disk is on fire" in info.detail


def test_a_run_killed_without_a_word_is_judged_by_its_process_and_log(tmp_path):
    """SIGKILL leaves status.json saying "running": a process that is gone is not."""
    with pytest.raises(KeyboardInterrupt):
        pretrain(load_recipe(DEMO, TINY), run_dir=tmp_path,
                 on_log=stop_at(2, KeyboardInterrupt()))
    status = json.loads((tmp_path / "status.json").read_text())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "status.json").write_text(json.dumps({**status, "state": "running",
                                                      "pid": int(gone)}))
    info = describe_run(tmp_path)
    assert info.state == "stopped" and f"process {gone}" in info.detail
    # Without status.json (an older run): a fresh log means running, an old one stopped.
    (tmp_path / "status.json").unlink()
    assert describe_run(tmp_path).state == "running"
    old = time.time() - LIVE_SECONDS - 60
    os.utime(tmp_path / "log.txt", (old, old))
    assert describe_run(tmp_path).state == "stopped"


@pytest.mark.slow  # two subprocesses, ~5 s; quick: describe_run's tests above
def test_runs_command_lists_runs_as_a_table_and_as_json(finished):
    result = cli("runs", str(finished.parent), "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["state"] == "finished" and row["step"] == 3 and row["kind"] == "pre-train"
    table = cli("runs", str(finished.parent))
    assert table.returncode == 0, table.stderr
    assert "finished" in table.stdout and "3/3" in table.stdout


@pytest.mark.slow  # the command line in a subprocess: ~12 s (in-process twin above)
def test_rerunning_a_finished_run_says_so_and_reports_its_final_loss(finished):
    sets = [arg for s in TINY for arg in ("--set", s)]
    result = cli("pretrain", str(DEMO), *sets, "--out", str(finished), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    last = json.loads((finished / "metrics.jsonl").read_text().splitlines()[-1])
    assert out["already_finished"] is True and out["final_loss"] == last["loss"]
    assert "already finished" in result.stderr
    text = cli("pretrain", str(DEMO), *sets, "--out", str(finished))
    assert text.returncode == 0 and "already finished" in text.stdout
    assert f"cratemae probe probe/demo --checkpoint {finished}" in text.stdout


def test_the_newest_run_resolver_sees_a_linked_run_once(tmp_path):
    """`find_runs` (reconstruct's and analyze's "newest run") and `cratemae runs` share one
    walk: a run reached through a link is one run, under the name without the link."""
    from cratemae.checkpoints.resolve import find_runs
    from cratemae.rundir import RunFiles

    run = tmp_path / "runs" / "a"
    RunFiles(run).checkpoints.mkdir(parents=True)
    RunFiles(run).recipe.write_text("")
    (tmp_path / "runs" / "link").symlink_to(run)
    (tmp_path / "runs" / "loop").symlink_to(tmp_path / "runs")
    assert find_runs(tmp_path / "runs") == [run]
