"""The GPU acceptance run (`benchmarks/gpu_check.sh`, issue 32): its verdicts, fed broken
figures (quick), and the whole CPU rehearsal (slow), so the run cannot rot before a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import acceptance_checks as C

LOSSES = [(1, 2.5), (2, 2.25), (3, 2.0), (4, 1.75)]
RECOVERY = {"kind": "recovery", "step": 4, "at_step": 6, "rolled_back_to": 4,
            "precision": "fp32", "lr_factor": 0.5, "recovery": 1}


def statuses(*checks: C.Check) -> list[str]:
    return [c.status for c in checks]


def test_resumed_losses_pass_bit_equal_and_fail_on_any_slip():
    assert C.losses_match("l", LOSSES, LOSSES, 0.0).status == C.PASS
    off_by_a_bit = [*LOSSES[:3], (4, math.nextafter(1.75, 2))]
    shifted = [(s + 1, v) for s, v in LOSSES]  # the resumed run compared a step later
    assert statuses(
        C.losses_match("l", off_by_a_bit, LOSSES, 0.0),
        C.losses_match("l", shifted, LOSSES, 0.0),
        C.losses_match("l", LOSSES[:3], LOSSES, 0.0),  # a step missing
        C.losses_match("l", [*LOSSES, (4, 1.75)], LOSSES, 0.0),  # a step twice
        C.losses_match("l", [], [], 0.0),  # nothing compared
        C.losses_match("l", [*LOSSES[:3], (4, math.nan)], LOSSES, 1.0),
    ) == [C.FAIL] * 6


def test_resumed_losses_on_cuda_use_the_stated_tolerance():
    near = [(s, v * (1 + 1e-3)) for s, v in LOSSES]
    assert C.losses_match("l", near, LOSSES, 2e-3).status == C.PASS
    assert C.losses_match("l", near, LOSSES, 5e-4).status == C.FAIL
    assert "bit-equal" in C.losses_match("l", LOSSES, LOSSES, 0.0).target


def test_sigterm_must_exit_3_with_a_checkpoint_inside_the_run():
    assert statuses(C.exit_code_is("s", 3, 3), C.stopped_between("c", 4, 3, 400)) == [C.PASS] * 2
    assert statuses(C.exit_code_is("s", 0, 3), C.exit_code_is("s", None, 3),
                    C.stopped_between("c", None, 3, 400), C.stopped_between("c", 400, 3, 400),
                    C.stopped_between("c", 2, 3, 400)) == [C.FAIL] * 5


def test_the_recovery_record_must_be_there_once_after_the_overflow_in_fp32():
    assert C.recovery_recorded("r", [{"kind": "train"}, RECOVERY], 6).status == C.PASS
    assert statuses(
        C.recovery_recorded("r", [{"kind": "train"}], 6),
        C.recovery_recorded("r", [RECOVERY, RECOVERY], 6),
        C.recovery_recorded("r", [{**RECOVERY, "precision": "bf16"}], 6),
        C.recovery_recorded("r", [{**RECOVERY, "at_step": 5}], 6),
        C.recovery_recorded("r", [{**RECOVERY, "rolled_back_to": 6}], 6),
    ) == [C.FAIL] * 5


def test_fp16_must_switch_to_fp32_once_and_stay():
    assert C.precisions_switch("p", ["fp16"] * 6 + ["fp32"] * 4, "fp16").status == C.PASS
    assert statuses(C.precisions_switch("p", ["fp16"] * 8, "fp16"),
                    C.precisions_switch("p", ["fp32"] * 8, "fp16"),
                    C.precisions_switch("p", ["fp16", "fp32", "fp16"], "fp16"),
                    C.precisions_switch("p", [], "fp16")) == [C.FAIL] * 4


def test_bounds_and_targets():
    assert statuses(C.within("m", 15.9, 16), C.at_least("s", 6000, 6000)) == [C.PASS] * 2
    assert statuses(C.within("m", 16.1, 16), C.at_least("s", 5999, 6000),
                    C.within("m", None, 16), C.at_least("s", math.nan, 1)) == [C.NOT_MET] * 4
    assert statuses(C.within("px", 3.5, 3.0, miss=C.FAIL),
                    C.within("px", math.nan, 3.0, miss=C.FAIL)) == [C.FAIL] * 2


def test_teardown_must_be_clean():
    assert C.clean_teardown("t", 0, "step 3 loss 1.0\n").status == C.PASS
    warning = ("[rank0]:[W1207 ProcessGroupNCCL.cpp:1250] Warning: WARNING: "
               "destroy_process_group() was not called before program exit")
    assert statuses(C.clean_teardown("t", 0, warning),
                    C.clean_teardown("t", None, ""),  # hung
                    C.clean_teardown("t", 1, "")) == [C.FAIL] * 3


def test_a_row_is_its_worst_check_and_an_empty_row_fails():
    ok, cuda, slow = C.Check("a", C.PASS, ""), C.needs_cuda("b", ""), C.Check("c", C.NOT_MET, "")
    assert C.Row(1, [ok, cuda]).status == C.NEEDS_CUDA
    assert C.Row(1, [ok, slow, cuda]).status == C.NOT_MET
    assert C.Row(1, [ok, C.Check("d", C.FAIL, ""), slow]).status == C.FAIL
    assert C.Row(1, []).status == C.FAIL
    line = C.line(C.Row(2, [C.losses_match("losses", LOSSES, LOSSES, 0.0)]))
    assert line.startswith("row 2 PASS: ") and "worst rel. diff" in line and "bit-equal" in line


def rows(status: str = C.PASS, missing: int | None = None) -> list[C.Row]:
    return [C.Row(n, [C.Check("x", status, "1")]) for n in C.ROWS if n != missing]


def test_exit_status_every_row_present_and_passing():
    assert C.exit_status(rows(), rehearse=False) == 0
    assert C.exit_status(rows(C.NEEDS_CUDA), rehearse=True) == 0
    assert C.exit_status(rows(C.NEEDS_CUDA), rehearse=False) == 1  # on a GPU, nothing waits
    assert C.exit_status(rows(C.NOT_MET), rehearse=True) == 1
    assert C.exit_status(rows(missing=4), rehearse=True) == 1
    assert C.exit_status(rows()[:2], rehearse=True, expected=[1, 2]) == 0


def test_the_summary_is_strict_json_with_every_row(tmp_path):
    path = tmp_path / "summary.json"
    C.write_summary(path, rows(C.NEEDS_CUDA), rehearse=True, device="cpu", wall_s=1.0)
    assert C.summary_problems(path.read_text(), rehearse=True) == []
    assert json.loads(path.read_text())["exit_status"] == 0
    assert C.summary_problems(path.read_text(), rehearse=False)  # needs CUDA is no GPU PASS
    C.write_summary(path, rows(missing=3), rehearse=True, device="cpu", wall_s=1.0)
    assert C.summary_problems(path.read_text(), rehearse=True) == ["row 3 missing"]
    assert C.summary_problems('{"rows": [], "wall_s": NaN}', True)[0].startswith("not strict")
    with pytest.raises(ValueError):  # a NaN figure cannot reach the file
        C.write_summary(path, rows(), rehearse=True, device="cpu", wall_s=math.nan)
    row = C.Row.from_dict(json.loads(path.read_text())["rows"][0])
    assert row.status == C.PASS and row.checks[0].figure == "1"


@pytest.mark.slow  # about a minute on two idle cores; its quick twins are the tests above
@pytest.mark.longest(1.5)
def test_the_rehearsal_passes_every_row(tmp_path):
    out = tmp_path / "gpu-results"
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--rehearse"],
                         cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OUT": str(out), "PY": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    assert C.summary_problems((out / "summary.json").read_text(), rehearse=True) == []
    printed = [x for x in run.stdout.splitlines() if x.startswith("row ")]
    assert [x.split()[1] for x in printed] == [str(n) for n in C.ROWS]
    assert all(x.split(":")[0].endswith((C.PASS, C.NEEDS_CUDA)) for x in printed)


def test_an_out_that_is_not_a_folder_is_one_error_line(tmp_path):
    """OUT naming a file or a device: one `error:` line, exit 2, the file untouched."""
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    for out in (file, "/dev/null"):
        run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--rehearse"],
                             env={**os.environ, "OUT": str(out)}, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().splitlines() == [
            f"error: OUT={out}: not a directory this run can write; give a folder"]
    assert file.read_text() == "keep"
