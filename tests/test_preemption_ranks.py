"""Several ranks (srun-style launch, gloo): a rank that dies takes the others down within
seconds, with one line and a non-zero status, never a hang in a collective; a stop signal to
every rank saves once and every rank exits 3."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from support import TINY_RUN, launch, wait_for_steps

from cratemae.errors import EXIT_REQUEUE

SETS = [*TINY_RUN, "schedule.max_steps=100000"]


@pytest.mark.slow  # two ranks started and one killed: about 10 s on two idle cores
def test_a_rank_that_dies_takes_the_other_down_in_seconds(tmp_path: Path) -> None:
    procs = launch(tmp_path / "run", SETS)
    wait_for_steps(tmp_path / "run", procs, 2)
    procs[1].send_signal(signal.SIGKILL)
    try:
        _, err = procs[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung in a collective after rank 1 died")
    finally:
        procs[1].wait()
    assert procs[0].returncode == 1, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [x for x in lines if x.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith("error: rank 0: ") and "failed, another rank has stopped" in \
        lines[-1]  # whichever collective rank 0 was in: the step's, the agreement's, a save's


@pytest.mark.slow  # two ranks, a save and a clean stop: about 15 s on two idle cores
def test_a_stop_signal_to_every_rank_saves_once_and_all_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = launch(out, SETS)
    wait_for_steps(out, procs, 2)
    for p in procs:  # as SLURM signals every task of the job
        p.send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_REQUEUE, EXIT_REQUEUE], errs
    assert all(e.strip().splitlines()[-1].startswith("error: stopped") for e in errs)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert len(saved) == 1  # rank 0 saved, once
