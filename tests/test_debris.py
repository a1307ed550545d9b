"""Cleaning up after unfinished saves touches only what this process or a dead one left: a
live process's save in progress (another job sharing the directory) is never removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cratemae.checkpoints.store import remove_debris


def test_debris_of_live_processes_is_left_alone(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            "theirs": f".step-000000005.tmp-{live.pid}",
            "dead": f".step-000000006.tmp-{dead.pid}",
            "mine": f".step-000000007.tmp-{os.getpid()}",
            "dead pointer": f".latest.tmp-{dead.pid}-0123abcd",
        }
        for name in names.values():
            (tmp_path / name).mkdir() if "step" in name else (tmp_path / name).write_bytes(b"")
        (tmp_path / "step-000000004").mkdir()  # a checkpoint: never debris
        remove_debris(tmp_path)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([names["theirs"], "step-000000004"])
    finally:
        live.kill()
        live.wait()
