"""`cratemae runs` never stops at one bad run: damaged files, FIFOs, unreadable folders,
links and link loops, a huge metrics.jsonl; and its table fits 100 columns. Runs here are
written by hand (a recipe, a metrics line or two, a status), so every test takes
milliseconds."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
from support import cli

from cratemae.rundir import RunFiles
from cratemae.train import runs as runs_module
from cratemae.train.lock import LOCK_FILE
from cratemae.train.runs import list_runs

GOOD_LINES = [
    {"step": 1, "total_steps": 4, "loss": 0.9},
    {"kind": "eval", "step": 2, "val_loss": 0.8, "val_knn_top1": 12.5},
    {"step": 2, "total_steps": 4, "loss": 0.7},
]


def make_run(where: Path, *, status: object = None, lines: list | None = None,
             recipe: str = '[model]\nname = "crate_mae_tiny"\n', metrics: bytes | None = None
             ) -> Path:
    where.mkdir(parents=True)
    files = RunFiles(where)
    files.recipe.write_text(recipe)
    if metrics is None:
        metrics = "".join(json.dumps(r) + "\n" for r in (GOOD_LINES if lines is None
                                                          else lines)).encode()
    files.metrics.write_bytes(metrics)
    if status is not None:
        text = status if isinstance(status, str) else json.dumps(status)
        files.status.write_text(text)
    return where


def running(pid: object) -> dict:
    return {"state": "running", "host": socket.gethostname(), "pid": pid}


def by_name(rows) -> dict:
    return {Path(r.path).name: r for r in rows}


DAMAGE = {
    "pid a string": dict(status=running("1234")),
    "pid null": dict(status=running(None)),
    "pid negative": dict(status=running(-1)),
    "pid zero": dict(status=running(0)),
    "pid beyond os.kill": dict(status=running(2**70)),
    "pid a bool": dict(status=running(True)),
    "host not a string": dict(status={"state": "running", "host": 3, "pid": 1}),
    "status a list": dict(status="[1, 2]"),
    "status torn": dict(status='{"state": "runn'),
    "status unknown state": dict(status={"state": "exploded"}),
    "metrics line a list": dict(lines=[[1, 2], *GOOD_LINES]),
    "metrics step a string": dict(lines=[{"step": "two", "loss": 0.5}, *GOOD_LINES]),
    "metrics step a fraction": dict(lines=[{"step": 1.5, "loss": 0.5}, *GOOD_LINES]),
    "metrics loss a string": dict(lines=[*GOOD_LINES, {"step": 3, "loss": "nan-ish"}]),
    "metrics binary garbage": dict(metrics=b'{"step": 1, "loss": 0.5}\n\xff\xfe\x00\x00\n'
                                           b'{"step": 2, "loss": 0.4}\n'),
    "metrics torn mid-file": dict(metrics=b'{"step": 1, "lo\n{"step": 2, "loss": 0.4}\n'),
    "recipe model a number": dict(recipe="model = 3\n"),
    "recipe model name a table": dict(recipe="[model.name]\nx = 1\n"),
    "recipe not toml": dict(recipe="[model\n"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_run_is_listed_as_unreadable_and_the_others_still_are(tmp_path, damage):
    make_run(tmp_path / "bad", **DAMAGE[damage])
    make_run(tmp_path / "good", status={"state": "stopped"})
    rows = by_name(list_runs(tmp_path))
    assert set(rows) == {"bad", "good"}
    assert rows["bad"].state == "unreadable" and rows["bad"].detail
    assert (rows["good"].state, rows["good"].step, rows["good"].loss) == ("stopped", 2, 0.7)


def test_a_last_line_cut_short_by_a_crash_is_not_damage(tmp_path):
    make_run(tmp_path / "r", metrics=b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    (row,) = list_runs(tmp_path)
    assert row.state != "unreadable" and row.step == 1


def test_the_command_lists_damaged_runs_exits_0_and_says_why_on_stderr(tmp_path):
    make_run(tmp_path / "bad", status=running("1234"))
    make_run(tmp_path / "good")
    result = cli("runs", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert rows["bad"]["state"] == "unreadable" and "pid" in rows["bad"]["detail"]
    assert f"warning: {tmp_path / 'bad'}: unreadable: status.json: pid" in result.stderr
    table = cli("runs", tmp_path)
    assert table.exit_code == 0 and "unreadable" in table.stdout


def fifo_does_not_block(path: Path, call) -> object:
    """`call()` with a FIFO at `path`: it must return within a second (a reader that opened
    the FIFO is freed by opening its other end, so a failing test does not hang)."""
    os.mkfifo(path)
    out: list = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(timeout=1)
    if worker.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
        pytest.fail(f"{path.name}: a FIFO was opened and waited on")
    return out[0]


@pytest.mark.parametrize("name", ["status", "metrics", "log", "finetune"])
def test_a_fifo_in_a_run_is_refused_not_waited_on(tmp_path, name):
    run = make_run(tmp_path / "r", status={"state": "stopped"})
    path = getattr(RunFiles(run), name)
    path.unlink(missing_ok=True)
    (row,) = fifo_does_not_block(path, lambda: list_runs(tmp_path))
    assert row.state == "unreadable" and "FIFO" in row.detail


def test_a_fifo_as_the_recipe_or_the_lock_never_blocks(tmp_path):
    run = make_run(tmp_path / "r", status={"state": "stopped"})
    (row,) = fifo_does_not_block(run / LOCK_FILE, lambda: list_runs(tmp_path))
    assert row.state == "stopped"  # a FIFO holds no lock
    RunFiles(run).recipe.unlink()
    (row,) = fifo_does_not_block(RunFiles(run).recipe, lambda: list_runs(tmp_path))
    assert row.state == "unreadable" and "FIFO" in row.detail


def test_a_folder_that_cannot_be_read_is_listed_not_left_out(tmp_path, monkeypatch):
    make_run(tmp_path / "good")
    (tmp_path / "locked").mkdir()  # chmod means nothing to root: refuse it by hand
    real = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(runs_module.os, "scandir", scandir)
    rows = by_name(list_runs(tmp_path))
    assert rows["locked"].state == "unreadable" and "Permission denied" in rows["locked"].detail
    assert rows["good"].state != "unreadable"


def test_a_run_reached_by_several_links_is_listed_once_by_its_own_name(tmp_path):
    make_run(tmp_path / "run")
    (tmp_path / "a-link").symlink_to(tmp_path / "run")
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "z-link").symlink_to(tmp_path / "run")
    (row,) = list_runs(tmp_path)
    assert Path(row.path) == tmp_path / "run"


def test_two_links_to_one_run_outside_are_one_row(tmp_path):
    make_run(tmp_path / "scratch" / "run")
    (tmp_path / "runs").mkdir()
    for name in ("b", "a"):
        (tmp_path / "runs" / name).symlink_to(tmp_path / "scratch" / "run")
    (row,) = list_runs(tmp_path / "runs")
    assert Path(row.path).name == "a"


def test_a_link_loop_and_a_dangling_link_are_listed_as_unreadable(tmp_path):
    make_run(tmp_path / "good")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "gone").symlink_to(tmp_path / "purged-scratch")
    (tmp_path / "up").symlink_to(tmp_path)  # a loop through a real folder: walked once
    rows = by_name(list_runs(tmp_path))
    assert set(rows) == {"good", "loop", "gone"}
    assert rows["loop"].state == rows["gone"].state == "unreadable"


def test_a_huge_metrics_file_is_read_from_its_end_only(tmp_path):
    """100 MB of NUL bytes (a sparse hole) before good lines: reading it whole would find
    the garbage; the table needs only the last lines."""
    run = make_run(tmp_path / "r")
    with open(RunFiles(run).metrics, "r+b") as f:
        f.truncate(100 * 2**20)
        f.seek(0, os.SEEK_END)
        f.write(b"\n" + "".join(json.dumps(r) + "\n" for r in GOOD_LINES).encode())
    (row,) = list_runs(tmp_path)
    assert (row.state, row.step, row.loss, row.val_loss) == ("failed", 2, 0.7, 0.8)


def test_the_table_fits_100_columns_with_one_word_states_and_rollbacks(tmp_path):
    long = "a-very-long-group-name/pretrain-crate-mae-base-800-epochs-lr-1.5e-4-seed-0"
    make_run(tmp_path / long, status={"state": "failed", "error": "x" * 200},
             lines=[*GOOD_LINES, {"kind": "recovery", "step": 2, "recovery": 2}])
    make_run(tmp_path / "probe-run", status={"state": "finished"})
    RunFiles(tmp_path / "probe-run").probe.write_text(json.dumps(
        {"checkpoint": "/scratch/someone/runs/" + "x" * 80 + "/checkpoints/step-000100000",
         "top1": 71.25}))
    result = cli("runs", tmp_path, env={"COLUMNS": "100"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, result.stdout
    assert "failed, rolled back 2x" in result.stdout and "x" * 20 not in result.stdout
    assert "finished" in result.stdout and "71.25" in result.stdout
    wide = cli("runs", tmp_path, "--wide", env={"COLUMNS": "100"})
    assert "x" * 200 in wide.stdout.replace("\n", "") and long in wide.stdout
    rows = json.loads(cli("runs", tmp_path, "--json").stdout)
    assert {r["state"] for r in rows} == {"failed", "finished"}
    assert {r["recoveries"] for r in rows} == {2, 0}
