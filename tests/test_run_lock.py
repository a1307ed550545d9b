"""One run per directory: a second run into a directory that a live run is writing is refused
in one line naming the holder; a dead run's lock is gone with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, TINY_RUN, wait_for_steps

from cratemae.errors import BadInputError
from cratemae.train.lock import RunLock, lock_holder


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        assert lock_holder(tmp_path).startswith(f"host {socket.gethostname()} pid {os.getpid()}")
        with pytest.raises(BadInputError, match=rf"another run is writing into this directory "
                                                 rf"\(host \S+ pid {os.getpid()} since "):
            RunLock(tmp_path).__enter__()
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):  # free again once left
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from cratemae.train.lock import "
            "RunLock; RunLock(Path(sys.argv[1])).__enter__(); print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    assert f"pid {proc.pid}" in (lock_holder(tmp_path) or "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):
        pass


def test_a_run_set_up_into_a_locked_directory_is_refused_before_it_writes(
        tmp_path: Path) -> None:
    from cratemae.recipe import Recipe
    from cratemae.train.setup import RunSetup

    with RunLock(tmp_path), pytest.raises(BadInputError, match="another run is writing"), \
                RunSetup(Recipe(), tmp_path) as run, run.open_run_dir():
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # no recipe.toml, no log


@pytest.mark.slow  # two commands, one of them training: about 15 s on two idle cores
def test_a_second_pretrain_into_a_running_directory_exits_2_and_the_first_goes_on(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = [f"--set={s}" for s in [*TINY_RUN, "schedule.max_steps=100000"]]
    args = [sys.executable, "-m", "cratemae", "pretrain", str(REPO / "recipes" / "demo.toml"),
            *sets, "--out", str(out)]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for_steps(out, [first], 1, timeout=120)
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert first.poll() is None  # still training, untouched by the second
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {out}: another run is writing into this directory "
                                f"(host {socket.gethostname()} pid {first.pid} since ")
    assert first.returncode == 3, err  # saved and stopped, as a preempted run does
    records = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in records]
    assert steps == list(range(1, len(steps) + 1))  # the first run's record, whole
