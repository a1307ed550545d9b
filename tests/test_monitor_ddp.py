"""Validation under DDP (two ranks, gloo, CPU): rank 0 evaluates while the other waits, the
run finishes, and each evaluation is written once -- one eval line in metrics.jsonl, one
samples/ picture -- however many ranks there are."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import TINY_RUN, launch

SETS = [*TINY_RUN, "schedule.max_steps=5", "run.eval_every_steps=2", "run.eval_images=32",
        "run.loggers=[]"]


@pytest.mark.slow  # two ranks, five steps, three evaluations: about 60 s on two busy cores
def test_two_ranks_evaluate_once_per_evaluation_step_and_finish(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = launch(out, SETS)
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=240)[1])
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks did not finish: a rank waits on one that evaluates")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps and at the end, once each
    assert [r["step"] for r in records if r.get("kind", "train") == "train"] == [1, 2, 3, 4, 5]
    assert all(e["eval_images"] == 32 for e in evals)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-000000002.png", "step-000000004.png", "step-000000005.png"]
    assert [e["samples"] for e in evals] == [
        f"samples/step-{s:09d}.png" for s in (2, 4, 5)]
