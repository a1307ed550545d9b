"""The GPU acceptance run (issue 32), or its CPU rehearsal with `--rehearse`.

    python benchmarks/acceptance.py [--rehearse] [ROW ...]     # via benchmarks/gpu_check.sh

Seven rows (`acceptance_checks.ROWS`), each in a forked child of this process with its own
time budget: the child starts its own session, so a row over budget is killed with every
process it started and the next row still runs. This process imports torch and cratemae
once (a fork inherits them: the rehearsal pays the imports once, not per row) and never
touches CUDA itself, so each child initialises CUDA afresh. A row's log goes to
$OUT/logs/rowN.log, its result to $OUT/rows/rowN.json; one line per row is printed, then
$OUT/summary.json is written. Exit 0 when every row is PASS (or `needs CUDA` in the
rehearsal), 1 otherwise, 2 without CUDA and without --rehearse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without a context
sys.path.insert(0, str(Path(__file__).resolve().parent))

import acceptance_checks as checks
import acceptance_rows as rows

# Seconds per row on the GPU (the sum, with start-up, stays under the 9 minutes of the issue)
# and in the rehearsal (hang guards on a shared 2-core CPU; the whole rehearsal takes ~40 s).
BUDGET_GPU = {1: 240, 2: 80, 3: 35, 4: 20, 5: 45, 6: 35, 7: 60}
BUDGET_REHEARSAL = {1: 30, 2: 40, 3: 30, 4: 20, 5: 40, 6: 40, 7: 20}


def main(argv: list[str]) -> int:
    rehearse = "--rehearse" in argv
    only = {int(a) for a in argv if a.isdigit()}
    out = Path(os.environ.get("OUT") or "benchmarks/gpu-results")
    for sub in ("rows", "logs", "work"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    import torch

    if not rehearse and not torch.cuda.is_available():
        print("error: no CUDA device here: the GPU run needs one (the CPU rehearsal is "
              "`bash benchmarks/gpu_check.sh --rehearse`)", file=sys.stderr)
        return 2
    device = "cpu (rehearsal)" if rehearse else rows.device_name()
    print(f"{device}, torch {torch.__version__}", flush=True)
    rows.preimport()
    if torch.cuda.is_initialized():  # a fork could not use CUDA any more
        print("error: CUDA was initialised before the rows started", file=sys.stderr)
        return 2
    import gpu_check

    # Row 7 reads row 1's memory figure only if this run wrote it.
    for stale in (name for name, *_ in gpu_check.ROWS):
        (out / f"{stale}.json").unlink(missing_ok=True)
    budgets = BUDGET_REHEARSAL if rehearse else BUDGET_GPU
    start, results = time.monotonic(), []
    for number in sorted(checks.ROWS):
        if only and number not in only:
            continue
        row = run_row(number, budgets[number], out, rehearse)
        results.append(row)
        print(checks.line(row) + f" ({row.wall_s:.0f} s)", flush=True)
    summary = checks.write_summary(out / "summary.json", results, rehearse=rehearse,
                                   device=device, wall_s=time.monotonic() - start)
    print(f"summary: {out / 'summary.json'} ({summary['wall_s']:.0f} s)", flush=True)
    return checks.exit_status(results, rehearse, expected=only or checks.ROWS)


def run_row(number: int, budget: float, out: Path, rehearse: bool) -> checks.Row:
    """Row `number` in a forked child of its own session, killed with its processes after
    `budget` seconds."""
    result, log = out / "rows" / f"row{number}.json", out / "logs" / f"row{number}.log"
    done = out / "rows" / f"row{number}.partial.json"
    for stale in (result, done):
        stale.unlink(missing_ok=True)
    work = out / "work" / f"row{number}"
    shutil.rmtree(work, ignore_errors=True)  # a rerun starts afresh (no run to resume)
    start = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.setsid()
        rows.PARTIAL.append(done)
        code = 0
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            row = checks.Row(number, rows.row_functions()[number](work,
                                                                rehearse))
            result.write_text(json.dumps(row.to_dict(), allow_nan=False))
        except BaseException:  # the row's failure is its verdict
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = _wait(pid, budget)
    wall = time.monotonic() - start
    if status is None:  # over budget: the row and every process it started
        _kill_session(pid)
        finished = json.loads(done.read_text()) if done.exists() else []
        return checks.Row(number, [*map(lambda c: checks.Check(**c), finished), checks.Check(
            "budget", checks.FAIL, f"killed after {budget:.0f} s", f"<= {budget:.0f} s")],
                          wall, str(log))
    _kill_session(pid)  # anything the row left behind
    if result.exists():
        row = checks.Row.from_dict(json.loads(result.read_text()))
        row.wall_s, row.log = wall, str(log)
        return row
    last = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:] or [""]
    return checks.Row(number, [checks.Check("crashed", checks.FAIL,
                                            f"status {status}: {last[0][:160]}", "a result")],
                      wall, str(log))


def _wait(pid: int, budget: float) -> int | None:
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def _kill_session(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
