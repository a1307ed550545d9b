"""A disk that fills while a run saves: one `error:` line naming the path, exit status 1, and
the previous checkpoint whole. The test mounts a small tmpfs, which needs root; elsewhere it
is skipped, saying so."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, TINY_RUN

from cratemae.checkpoints import load_checkpoint

TINY = [
    *TINY_RUN, "run.checkpoint_every_steps=2",
    "run.keep_last=1", "schedule.max_steps=100000",
]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# quick twin: tests/test_fs.py, a write that fails with a full disk keeps the old file
@pytest.mark.slow
def test_a_disk_that_fills_mid_run_is_one_line_and_the_last_checkpoint_survives(
        small_disk: Path) -> None:
    out = small_disk / "run"
    args = [sys.executable, "-m", "cratemae", "pretrain", str(REPO / "recipes" / "demo.toml"),
            *[f"--set={s}" for s in TINY], "--out", str(out)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    saved = (out / "checkpoints" / "latest").read_text().strip()
    with open(small_disk / "filler", "wb") as f:  # take every byte that is left
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and "Traceback" not in err, err
    assert str(small_disk) in lines[-1] and "No space left on device" in lines[-1]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest >= saved  # the pointer names a checkpoint that was completed
    checkpoint = load_checkpoint(out / "checkpoints" / latest)  # verified against its hashes
    assert checkpoint.step is not None and checkpoint.step >= 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
