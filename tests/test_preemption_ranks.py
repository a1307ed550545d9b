"""Several ranks (srun-style launch, gloo): a rank that dies takes the others down within
seconds, with one line and a non-zero status, never a hang in a collective; a stop signal to
every rank saves once and every rank exits 3."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cratemae.errors import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.embed_dim=32", "model.decoder_embed_dim=32", "model.depth=1", "model.decoder_depth=1",
    "model.num_heads=2", "model.decoder_num_heads=2", "data.batch_size=16", "data.num_workers=0",
    "schedule.warmup_epochs=0.05", "run.log_every=1", "schedule.max_steps=100000",
]


def launch(out: Path) -> list[subprocess.Popen[str]]:
    """Two ranks as `srun` starts them: rank and rendezvous from SLURM's variables alone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = 20000 + s.getsockname()[1] % 20000
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    args = [sys.executable, "-m", "cratemae", "pretrain", str(REPO / "recipes" / "demo.toml"),
            *[f"--set={s}" for s in TINY], "--out", str(out)]
    return [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**clean, "SLURM_PROCID": str(rank),
                                             "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                                             "SLURM_JOB_NODELIST": "localhost",
                                             "SLURM_JOB_ID": str(port - 20000)})
            for rank in range(2)]


def wait_for_steps(out: Path, procs: list[subprocess.Popen[str]], steps: int) -> None:
    deadline = time.monotonic() + 180
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the two ranks did not start training")
        time.sleep(0.1)


@pytest.mark.slow  # two ranks started and one killed: about 10 s on two idle cores
def test_a_rank_that_dies_takes_the_other_down_in_seconds(tmp_path: Path) -> None:
    procs = launch(tmp_path / "run")
    wait_for_steps(tmp_path / "run", procs, 2)
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung in a collective after rank 1 died")
    finally:
        procs[1].wait()
    assert time.monotonic() - start < 60
    assert procs[0].returncode == 1, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [x for x in lines if x.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith("error: rank 0: ") and "failed, another rank has stopped" in \
        lines[-1]  # whichever collective rank 0 was in: the step's, the agreement's, a save's


@pytest.mark.slow  # two ranks, a save and a clean stop: about 15 s on two idle cores
def test_a_stop_signal_to_every_rank_saves_once_and_all_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = launch(out)
    wait_for_steps(out, procs, 2)
    for p in procs:  # as SLURM signals every task of the job
        p.send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_REQUEUE, EXIT_REQUEUE], errs
    assert all(e.strip().splitlines()[-1].startswith("error: stopped") for e in errs)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert len(saved) == 1  # rank 0 saved, once
