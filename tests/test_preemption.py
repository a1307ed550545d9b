"""Preemption as a cluster does it: SIGTERM or SIGUSR1 sent to every process of the job
(the command and its DataLoader workers), at any moment. The run saves, exits 3, and the same
command resumes it exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, SMALLEST_MODEL, wait_for_steps

from cratemae.checkpoints import load_checkpoint
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE

TINY = [
    *SMALLEST_MODEL, "data.batch_size=16",
    "schedule.warmup_epochs=0.05", "run.log_every=1", "data.num_workers=2",
]


def command(out: Path, max_steps: int) -> list[str]:
    sets = [f"--set={s}" for s in [*TINY, f"schedule.max_steps={max_steps}"]]
    return [sys.executable, "-m", "cratemae", "pretrain", str(REPO / "recipes" / "demo.toml"),
            *sets, "--out", str(out)]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def start(out: Path, max_steps: int) -> subprocess.Popen[str]:
    # A session of its own: its process group is the command and its workers, as a job's is.
    return subprocess.Popen(command(out, max_steps), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_the_job(out: Path, sig: signal.Signals) -> int:
    """Start a run, signal its whole process group after two steps; the step it saved."""
    proc = start(out, 400)
    wait_for_steps(out, [proc], 2, timeout=120)
    os.killpg(proc.pid, sig)  # the command and its two DataLoader workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: stopped")
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped = load_checkpoint(out / "checkpoints" / latest).meta["step"]
    assert 2 <= stopped < 400
    return stopped


# quick twins: the flag tests below and tests/test_trust_weights.py's in-process SIGTERM
@pytest.mark.slow
def test_sigterm_to_the_whole_job_saves_and_exits_3(tmp_path: Path) -> None:
    """With DataLoader workers running: they must outlive the signal until the save."""
    stop_the_job(tmp_path / "run", signal.SIGTERM)


@pytest.mark.slow  # three runs: about 25 s on two idle cores
def test_sigusr1_to_the_whole_job_saves_exits_3_and_resumes_exactly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stopped = stop_the_job(out, signal.SIGUSR1)
    resumed = subprocess.run(command(out, stopped + 3), cwd=REPO, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / "straight"
    whole = subprocess.run(command(straight, stopped + 3), cwd=REPO, capture_output=True,
                           text=True)
    assert whole.returncode == 0, whole.stderr
    assert losses(out) == losses(straight)  # the same losses at every step, to the bit


# quick twin: test_the_training_commands_listen_from_their_first_line
@pytest.mark.slow
def test_a_signal_during_start_up_exits_3_in_one_line(tmp_path: Path) -> None:
    """Sent while the command sets the run up (after the data are listed and the model is
    built, before the first step): no 143, no silence, no traceback."""
    out = tmp_path / "run"
    proc = start(out, 400)
    assert proc.stderr is not None
    for line in proc.stderr:  # the first line the run logs: its plan, before any step
        if "warm-up" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, (proc.returncode, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.strip().splitlines()[-1]]


def test_flags_nest_and_forget_a_signal_once_the_last_is_left() -> None:
    with PreemptionFlag() as outer:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert outer.requested
        with PreemptionFlag() as inner:
            assert inner.requested  # a stop received during start-up is not lost
        assert outer.requested
    with PreemptionFlag() as later:
        assert not later.requested  # the next run in this process starts afresh


@pytest.mark.parametrize("name", ["pretrain", "finetune", "probe"])
def test_the_training_commands_listen_from_their_first_line(name: str) -> None:
    import importlib

    from cratemae.commands._cli_utils import preemptible

    @preemptible
    def command() -> bool:
        os.kill(os.getpid(), signal.SIGTERM)  # as if sent while the recipe is read
        return PreemptionFlag().requested

    assert command() is True
    entry = getattr(importlib.import_module(f"cratemae.commands.{name}"), name)
    assert entry.__code__ is command.__code__  # the command is wrapped the same way
