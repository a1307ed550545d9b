"""The verdicts of the GPU acceptance run (`benchmarks/acceptance.py`): pure functions.

Each takes figures and returns a `Check` (PASS / FAIL / NOT MET / needs CUDA, the figure and
the target in words); a row's status is the worst of its checks. Nothing here imports torch,
so `tests/test_gpu_acceptance.py` feeds them broken figures in microseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, NOT_MET, NEEDS_CUDA = "PASS", "FAIL", "NOT MET", "needs CUDA"
# Worst first: a row is as bad as its worst check.
SEVERITY = {FAIL: 3, NOT_MET: 2, NEEDS_CUDA: 1, PASS: 0}
ROWS = {
    1: "fast path = reference; speed and memory (Base, b256, 224 px, bf16)",
    2: "pretrain, SIGTERM, resume = uninterrupted run",
    3: "fp16 + GradScaler, injected overflow, rollback_fp32",
    4: "GPU JPEG decode vs Pillow",
    5: "embed CUDA vs CPU; probe, finetune",
    6: "torchrun --nproc-per-node 1: start-up, run, teardown",
    7: "peak memory: Base b256; largest batch in 16 GiB (checkpointing)",
}


@dataclass
class Check:
    name: str
    status: str
    figure: str
    target: str = ""


@dataclass
class Row:
    number: int
    checks: list[Check] = field(default_factory=list)
    wall_s: float = 0.0
    log: str = ""

    @property
    def status(self) -> str:
        if not self.checks:
            return FAIL  # a row that checked nothing proved nothing
        return max((c.status for c in self.checks), key=SEVERITY.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.number, "title": ROWS.get(self.number, "?"), "status": self.status,
                "wall_s": round(self.wall_s, 1), "log": self.log,
                "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        return cls(int(data["row"]), [Check(**c) for c in data["checks"]],
                   float(data.get("wall_s", 0.0)), str(data.get("log", "")))


def needs_cuda(name: str, what: str) -> Check:
    """A CUDA-only assertion in the rehearsal: said, never skipped silently."""
    return Check(name, NEEDS_CUDA, what, "runs on the GPU run only")


# --- the verdicts ---------------------------------------------------------------------------
def exit_code_is(name: str, got: int | None, want: int) -> Check:
    return Check(name, PASS if got == want else FAIL, f"exit {got}", f"exit {want}")


def losses_match(name: str, resumed: Sequence[tuple[int, float]],
                 straight: Sequence[tuple[int, float]], rel_tol: float) -> Check:
    """(step, loss) of the resumed run against the uninterrupted one: the same steps, each
    loss within `rel_tol` relative (0: bit-equal)."""
    a, b = dict(resumed), dict(straight)
    if not b or sorted(a) != sorted(b) or len(a) != len(resumed):
        return Check(name, FAIL, f"steps {sorted(a)} vs {sorted(b)}", "the same steps")
    worst = max(_rel(a[s], b[s]) for s in b)
    target = "bit-equal" if rel_tol == 0 else f"rel. diff <= {rel_tol:.0e}"
    ok = worst <= rel_tol and all(math.isfinite(v) for v in a.values())
    return Check(name, PASS if ok else FAIL,
                 f"{len(b)} steps, worst rel. diff {worst:.1e}", target)


def _rel(x: float, y: float) -> float:
    if x == y:
        return 0.0
    return abs(x - y) / max(abs(y), 1e-12) if math.isfinite(x) and math.isfinite(y) else math.inf


def stopped_between(name: str, stopped: int | None, first: int, last: int) -> Check:
    """The SIGTERM run saved a checkpoint strictly inside the run."""
    ok = stopped is not None and first <= stopped < last
    return Check(name, PASS if ok else FAIL, f"checkpoint at step {stopped}",
                 f"{first} <= step < {last}")


def recovery_recorded(name: str, records: Iterable[Mapping[str, Any]], at_or_after: int,
                      precision: str = "fp32") -> Check:
    """A `"kind": "recovery"` line that rolled back after the injected overflow and goes on
    in `precision`."""
    found = [r for r in records if r.get("kind") == "recovery"]
    ok = (len(found) == 1 and found[0].get("precision") == precision
          and int(found[0].get("at_step", -1)) >= at_or_after
          and int(found[0].get("rolled_back_to", 1 << 30)) < int(found[0]["at_step"]))
    figure = (f"{len(found)} record(s)" + (f": at step {found[0].get('at_step')}, back to "
              f"{found[0].get('rolled_back_to')}, {found[0].get('precision')}" if found else ""))
    return Check(name, PASS if ok else FAIL, figure,
                 f"1 record, at step >= {at_or_after}, back to an earlier step, {precision}")


def precisions_switch(name: str, seen: Sequence[str], before: str, after: str = "fp32") -> Check:
    """The steps ran in `before` until the rollback, then in `after` to the end."""
    k = next((i for i, p in enumerate(seen) if p != before), len(seen))
    ok = 0 < k < len(seen) and all(p == after for p in seen[k:])
    return Check(name, PASS if ok else FAIL, f"{k} steps {before}, then {seen[k:k + 1]} x "
                 f"{len(seen) - k}", f"{before}, then {after} to the end")


def within(name: str, value: float | None, limit: float, unit: str = "",
           miss: str = NOT_MET) -> Check:
    """value <= limit; `miss` is the status when not (NOT MET for a target, FAIL for a
    correctness bound)."""
    ok = value is not None and math.isfinite(value) and value <= limit
    shown = "none" if value is None else f"{value:.3g}{unit}"
    return Check(name, PASS if ok else miss, shown, f"<= {limit:g}{unit}")


def at_least(name: str, value: float | None, floor: float, unit: str = "") -> Check:
    ok = value is not None and math.isfinite(value) and value >= floor
    shown = "none" if value is None else f"{value:,.0f}{unit}"
    return Check(name, PASS if ok else NOT_MET, shown, f">= {floor:,g}{unit}")


def clean_teardown(name: str, returncode: int | None, stderr: str) -> Check:
    """Exit 0, no hang (returncode None), no word of an unfinished process group."""
    bad = [line for line in stderr.splitlines()
           if "destroy_process_group" in line or ("process group" in line.lower()
           and "destroy" in line.lower())]
    ok = returncode == 0 and not bad
    figure = "hung" if returncode is None else f"exit {returncode}"
    return Check(name, PASS if ok else FAIL, figure + (f"; {bad[0].strip()[:80]}" if bad else ""),
                 "exit 0, no process-group warning")


# --- the run as a whole ---------------------------------------------------------------------
def line(row: Row) -> str:
    """One printed line per row: status, then each check's figure against its target."""
    parts = [f"{c.name} {c.figure}" + (f" (target {c.target})" if c.target else "")
             + ("" if c.status == PASS else f" [{c.status}]") for c in row.checks]
    return f"row {row.number} {row.status}: {ROWS.get(row.number, '?')}: " + "; ".join(parts)


def exit_status(rows: Sequence[Row], rehearse: bool, expected: Iterable[int] = ROWS) -> int:
    """0 when every expected row is there and PASS (or needs CUDA in the rehearsal)."""
    allowed = {PASS, NEEDS_CUDA} if rehearse else {PASS}
    numbers = sorted(r.number for r in rows)
    return 0 if numbers == sorted(expected) and all(r.status in allowed for r in rows) else 1


def write_summary(path: Path, rows: Sequence[Row], *, rehearse: bool, device: str,
                  wall_s: float) -> dict[str, Any]:
    summary = {"rehearsal": rehearse, "device": device, "wall_s": round(wall_s, 1),
               "exit_status": exit_status(rows, rehearse),
               "rows": [r.to_dict() for r in sorted(rows, key=lambda r: r.number)]}
    path.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return summary


def summary_problems(text: str, rehearse: bool) -> list[str]:
    """What is wrong with a summary.json (strict JSON, every row, allowed statuses)."""
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except ValueError as err:
        return [f"not strict JSON: {err}"]
    rows = {r.get("row"): r for r in data.get("rows", [])}
    problems = [f"row {n} missing" for n in ROWS if n not in rows]
    allowed = {PASS, NEEDS_CUDA} if rehearse else {PASS}
    problems += [f"row {n}: {r.get('status')}" for n, r in sorted(rows.items())
                 if r.get("status") not in allowed]
    return problems
