"""What the tests share, in one place: where the repository is, a tiny pre-training recipe,
one way to run a command in-process, and the two-rank launch of the DDP tests.

Imported as `from support import ...` (pytest puts tests/ on sys.path). Fixtures live in
conftest.py; the hand-made images and shards of the data tests in data_fixtures.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo.toml"
PROBE_DEMO_RECIPE = REPO / "recipes" / "probe" / "demo.toml"

# The demo recipe's model made smaller, so that pre-training it takes seconds (the session's
# `demo_checkpoint` in conftest.py).
TINY_MODEL = [
    "model.embed_dim=64", "model.decoder_embed_dim=64", "model.depth=2", "model.decoder_depth=1",
]
# The demo recipe's model at its smallest that still trains: a step takes milliseconds.
SMALLEST_MODEL = [
    "model.embed_dim=32", "model.decoder_embed_dim=32", "model.depth=1", "model.decoder_depth=1",
    "model.num_heads=2", "model.decoder_num_heads=2",
]
TINY = [*SMALLEST_MODEL, "data.batch_size=16"]
# What the subprocess runs add: no DataLoader workers, a short warm-up, a line every step.
TINY_RUN = [*TINY, "data.num_workers=0", "schedule.warmup_epochs=0.05", "run.log_every=1"]

# A wide terminal and no colours, so help texts and messages compare as plain lines.
CLI_ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def tiny_recipe(*sets: str, recipe: Path = DEMO_RECIPE):
    """The demo recipe with the tiny model, then `sets` (as `--set` gives them)."""
    from cratemae.recipe import load_recipe

    return load_recipe(recipe, [*TINY, *sets])


def cli(*args: object, env: dict[str, str] | None = None) -> Result:
    """`cratemae ARGS...` in this process, through Typer's CliRunner."""
    from cratemae.commands.app import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args], env={**CLI_ENV, **(env or {})})


def launch(out: Path, sets: Sequence[str], ranks: int = 2) -> list[subprocess.Popen[str]]:
    """`cratemae pretrain` on the demo recipe as `srun` starts it, one process per rank: rank
    and rendezvous from SLURM's variables alone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = 20000 + s.getsockname()[1] % 20000
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    args = [sys.executable, "-m", "cratemae", "pretrain", str(DEMO_RECIPE),
            *[f"--set={s}" for s in sets], "--out", str(out)]
    return [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**clean, "SLURM_PROCID": str(rank),
                                             "SLURM_NTASKS": str(ranks),
                                             "SLURM_LOCALID": str(rank),
                                             "SLURM_JOB_NODELIST": "localhost",
                                             "SLURM_JOB_ID": str(port - 20000)})
            for rank in range(ranks)]


def wait_for_steps(out: Path, procs: Sequence[subprocess.Popen[str]], steps: int,
                   timeout: float = 180) -> None:
    """Until the run in `out` has logged `steps` lines; fails if a process ends first (or
    nothing comes within `timeout` seconds: a hang guard, not a measure)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            errs = [p.communicate()[1][-2000:] for p in procs]
            pytest.fail(f"the run did not log {steps} steps: {errs}")
        time.sleep(0.1)
