"""The rows of the GPU acceptance run (`benchmarks/acceptance.py`), each as a user runs
the product: the `cratemae` command (in this process through its Typer app, or as a process
where the row is about processes: SIGTERM, torchrun) or the public API.

Rows 1-3, 6 and 7 are here, 4 and 5 (data and features) in `acceptance_data_rows`. Each row
is `row_N(work, rehearse) -> list[Check]`. With `rehearse` the same row runs on the
CPU at tiny sizes (a 32-wide, 1-layer model, batch 8, a few steps) and every assertion that
only a GPU can make is a `needs CUDA` check, never left out.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import acceptance_checks as C

REPO = Path(__file__).resolve().parents[1]
Checks = list[C.Check]
# The demo recipe at its smallest (tests/support.py's SMALLEST_MODEL), for the rehearsal.
TINY = ["model.embed_dim=32", "model.decoder_embed_dim=32", "model.depth=1",
        "model.decoder_depth=1", "model.num_heads=2", "model.decoder_num_heads=2",
        "data.batch_size=8", "data.num_workers=0", "run.precision=\"fp32\""]
# The demo recipe as shipped, on the GPU: bf16 and compiled (the row 2).
GPU = ["data.num_workers=4", "run.precision=\"bf16\"", "run.compile=true"]
COMMON = ["schedule.warmup_epochs=0.05", "run.log_every=1", "run.loggers=[]"]
# A resumed run's losses against the uninterrupted run's on CUDA: relative, per step. Not
# bit-equal there: cratemae sets no deterministic algorithms, and kernels of the backward
# (cuDNN's convolution weight gradient, the attention backward) may add in an order that
# varies from run to run, so the weights of two runs differ in their last bits after the first
# step. That should stay ~1e-6..1e-4 over a few steps (unmeasured); a wrong resume (another
# batch, mask, lr or optimizer state) moves a step's loss by percents: the figure prints the
# run's own step-to-step change for scale (5e-2..1.7e-1 in the rehearsal).
CUDA_LOSS_TOL = 2e-3

def preimport() -> None:
    """What the rows import, loaded once in the parent (forked children inherit it)."""
    import torch._dynamo  # noqa: F401 - the position table's compiler.disable mark needs it

    import cratemae.bench.speed
    import cratemae.commands.app
    import cratemae.eval.embeddings
    import cratemae.tasks.pretrain  # noqa: F401
    from cratemae.data.demo import ensure_demo

    ensure_demo()  # once, before the rows (a fresh machine generates it: seconds)


def device_name() -> str:
    """The GPU's name from nvidia-smi: asking torch would create a CUDA context in the parent,
    which its forked rows could not use."""
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return run.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cuda"


# --- helpers --------------------------------------------------------------------------------
PARTIAL: list[Path] = []  # where a long row leaves its finished checks, should its budget end


def partial(checks: Checks) -> None:
    """Save the checks so far: a row killed by its budget still shows what it measured."""
    if PARTIAL:
        PARTIAL[0].write_text(json.dumps([C.asdict(c) for c in checks], allow_nan=False))


def cli(*args: object) -> int:
    """`cratemae ARGS...` in this process (the console script's own app); its exit status."""
    from cratemae.commands.app import build_app

    print("$ cratemae " + " ".join(map(str, args)), flush=True)
    try:
        build_app()(args=[str(a) for a in args], prog_name="cratemae")
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def sets(*items: str) -> list[str]:
    return [f"--set={s}" for s in items]


def pretrain_args(out: Path, rehearse: bool, *extra: str) -> list[str]:
    return ["pretrain", "demo", *sets(*(TINY if rehearse else GPU), *COMMON, *extra),
            "--out", str(out)]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("kind", "train") == "train"
            and "loss" in r]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def saved_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    from cratemae.checkpoints import load_checkpoint

    return int(load_checkpoint(run_dir / "checkpoints" / latest.read_text().strip())
               .meta["step"])


# --- row 1: the fast path and the speed rows ------------------------------------------------
def row_1(work: Path, rehearse: bool) -> Checks:
    """The fast path against the float64 reference at a tiny size (CPU, both modes), then
    gpu_check.py's four rows on CUDA, each checked against the reference before timing."""
    import gpu_check
    import torch

    from cratemae.bench.speed import BenchSpec, run_bench
    from cratemae.errors import CrateMAEError

    out = work.parent.parent
    spec = BenchSpec(model="crate_mae_tiny", img_size=32, batch_size=4, steps=1, warmup=0,
                     precision="fp32", device="cpu", reference=True)
    checks = [_bench_check("fast path = reference (tiny, CPU fp32)", spec, run_bench)]
    partial(checks)
    for name, overrides, target, memory in gpu_check.ROWS:
        if rehearse:
            checks.append(C.needs_cuda(name, "Base b256 224 px bf16: check vs reference, img/s"))
            continue
        start = time.monotonic()
        try:
            result = run_bench(BenchSpec(**gpu_check.BASE, **overrides, device="cuda"))
        except CrateMAEError as err:
            checks.append(C.Check(name, C.FAIL, str(err)[:160], "check vs reference"))
            continue
        result["wall_s"] = time.monotonic() - start
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, allow_nan=False))
        print(gpu_check._line(name, result, target, memory), flush=True)
        fast = result["paths"]["fast"]
        check = result["checks"]["fast"]
        checks.append(C.within(f"{name} grad err vs reference", check["grad_rel_err"],
                               check["allowed_grad"], miss=C.FAIL))
        if target is not None:
            checks.append(C.at_least(f"{name} speed", fast["images_per_s"], target, " img/s"))
        if memory is not None:
            checks.append(C.within(f"{name} memory", fast["peak_memory_gib"], memory, " GiB"))
        partial(checks)
        torch.cuda.empty_cache()
    return checks


def _bench_check(name: str, spec, run_bench) -> C.Check:
    from cratemae.errors import CrateMAEError

    try:
        result = run_bench(spec)
    except CrateMAEError as err:
        return C.Check(name, C.FAIL, str(err)[:160], "within the fp32 tolerance")
    fast = result["checks"]["fast"]
    return C.within(name, fast["grad_rel_err"], fast["allowed_grad"], miss=C.FAIL)


# --- row 2: SIGTERM and resume --------------------------------------------------------------
def row_2(work: Path, rehearse: bool) -> Checks:
    """`cratemae pretrain` stopped by SIGTERM after 3 steps (a process of its own), rerun to
    3 steps past the stop, against the same command run straight through."""
    stopped_dir, straight_dir = work / "stopped", work / "straight"
    proc = subprocess.Popen([sys.executable, "-m", "cratemae",
                             *pretrain_args(stopped_dir, rehearse, "schedule.max_steps=400")],
                            cwd=REPO, stdout=sys.stdout, stderr=sys.stderr)
    while len(train_losses(stopped_dir)) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    stopped = saved_step(stopped_dir)
    checks = [C.exit_code_is("SIGTERM", code, 3), C.stopped_between("saved", stopped, 3, 400)]
    if stopped is None:
        return checks
    end = f"schedule.max_steps={stopped + 3}"
    checks.append(C.exit_code_is("resume", cli(*pretrain_args(stopped_dir, rehearse, end)), 0))
    checks.append(C.exit_code_is("straight", cli(*pretrain_args(straight_dir, rehearse, end),
                                                 "--resume", "never"), 0))
    straight = train_losses(straight_dir)
    check = C.losses_match("losses", train_losses(stopped_dir), straight,
                           0.0 if rehearse else CUDA_LOSS_TOL)
    steps = [C._rel(a[1], b[1]) for a, b in itertools.pairwise(straight)]
    lo, hi = min(steps, default=0.0), max(steps, default=0.0)
    check.figure += f" (the run's own next-step change {lo:.1e}..{hi:.1e})"
    return [*checks, check]


# --- row 3: fp16 overflow, rollback to float32 ----------------------------------------------
def row_3(work: Path, rehearse: bool) -> Checks:
    """`pretrain()` in fp16 (GradScaler) whose loss overflows to inf at steps 5 and 6: with
    nan_patience 2 the run rolls back to step 4 and ends in float32."""
    from cratemae.checkpoints import load_checkpoint
    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import MAETask, pretrain
    from cratemae.train import trainer

    real_loss, real_step, hit, seen = MAETask.loss, trainer.TrainStep.step, [], []

    def loss(self, model, batch, micro):  # the overflow, once per micro-batch (4, 5)
        out = real_loss(self, model, batch, micro)
        if micro in (4, 5) and micro not in hit:
            hit.append(micro)
            return out * float("inf")
        return out

    def step(self, batches, state, counts=None):
        seen.append(self.precision.name)
        return real_step(self, batches, state, counts)

    MAETask.loss, trainer.TrainStep.step = loss, step
    sizes = TINY if rehearse else ["data.num_workers=4"]
    recipe = load_recipe("demo", [*sizes, *COMMON, 'run.precision="fp16"',
                                  "schedule.max_steps=8", "run.checkpoint_every_steps=2",
                                  "run.nan_patience=2", 'run.nan_recovery="rollback_fp32"'])
    pretrain(recipe, run_dir=work)
    meta = load_checkpoint(work / "checkpoints" / "step-000000008").meta
    checks = [C.recovery_recorded("recovery record", metrics(work), at_or_after=6),
              C.Check("ends in fp32", C.PASS if meta.get("fp32") is True else C.FAIL,
                      f"checkpoint fp32={meta.get('fp32')}", "fp32=True")]
    if rehearse:
        checks.append(C.needs_cuda("fp16 then fp32", f"the CPU ran {sorted(set(seen))} only"))
    else:
        checks.append(C.precisions_switch("fp16 then fp32", seen, "fp16"))
    return checks


# --- row 6: torchrun ------------------------------------------------------------------------
def row_6(work: Path, rehearse: bool) -> Checks:
    """`torchrun --nproc-per-node 1 -m cratemae pretrain` for 3 steps: NCCL on a GPU (gloo on
    the CPU), and a teardown without a word about an unfinished process group."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "1", "-m", "cratemae",
            *pretrain_args(work, rehearse, "schedule.max_steps=3", "run.compile=false")]
    env = {**os.environ, "TORCH_CPP_LOG_LEVEL": "WARNING"}
    try:
        run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=30,
                             env=env)
        code, err = run.returncode, run.stderr
    except subprocess.TimeoutExpired as stop:
        code, err = None, (stop.stderr or b"").decode(errors="replace")
    sys.stderr.write(err)
    backend = "nccl" if not rehearse else "gloo"
    log = (work / "log.txt").read_text() if (work / "log.txt").exists() else ""
    where = "cuda" if not rehearse else "cpu"
    return [C.clean_teardown("torchrun", code, err),
            C.Check("3 steps logged", C.PASS if len(train_losses(work)) == 3 else C.FAIL,
                    str(len(train_losses(work))), "3"),
            C.Check(f"on {where} ({backend})", C.PASS if f"on {where}" in log else C.FAIL,
                    "log says " + ("so" if f"on {where}" in log else "otherwise"),
                    f"1 process(es) on {where}")]


# --- row 7: peak memory ---------------------------------------------------------------------
def row_7(work: Path, rehearse: bool) -> Checks:
    """Peak memory of Base at batch 256 (bf16, compiled: row 1's measurement, or its own), and
    of pre-training at the largest batch the dry run says fits 16 GiB with checkpointing."""
    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import plan_pretrain

    demo = ['data.train="demo:train"', 'data.val="demo:val"', "data.num_workers=0"]
    plan = plan_pretrain(load_recipe("base", [*demo, "run.grad_checkpointing=true"]),
                         run_dir=work / "plan", gpu_memory=16)
    memory, gib = plan.memory, 2**30
    largest = memory.largest_batch(16 * gib, checkpointing=True) if memory else 0
    estimate = memory.total(False, 256) / gib if memory else float("nan")
    checks = [C.Check("dry run, 16 GiB, checkpointing", C.PASS if largest else C.FAIL,
                      f"largest batch {largest} (estimate at b256 plain: {estimate:.1f} GiB)",
                      "a batch")]
    if rehearse:
        return [*checks, C.needs_cuda("Base b256 bf16 compiled", "peak memory"),
                C.needs_cuda(f"batch {largest} checkpointed", "peak memory <= 16 GiB")]
    checks.append(_peak_checkpointed(work, largest, demo))
    partial(checks)
    return [*checks, _peak_b256(work.parent.parent)]


def _peak_b256(out: Path) -> C.Check:
    import gpu_check

    from cratemae.bench.speed import BenchSpec, run_bench

    row1 = out / "full_compiled.json"
    if row1.exists():
        gib = json.loads(row1.read_text())["paths"]["fast"]["peak_memory_gib"]
        return C.within("Base b256 bf16 compiled (row 1)", gib, 16.0, " GiB")
    spec = BenchSpec(**gpu_check.BASE, compile=True, steps=2, warmup=1, device="cuda")
    gib = run_bench(spec)["paths"]["fast"]["peak_memory_gib"]
    return C.within("Base b256 bf16 compiled", gib, 16.0, " GiB")


def _peak_checkpointed(work: Path, batch: int, demo: list[str]) -> C.Check:
    import torch

    from cratemae.recipe import load_recipe
    from cratemae.tasks.pretrain import pretrain

    torch.cuda.reset_peak_memory_stats()
    recipe = load_recipe("base", [*demo[:2], "data.num_workers=8", f"data.batch_size={batch}",
                                  "run.grad_checkpointing=true", 'run.precision="bf16"',
                                  "run.compile=false",
                                  "schedule.max_steps=2", "run.loggers=[]"])
    pretrain(recipe, run_dir=work / "run")
    gib = torch.cuda.max_memory_allocated() / 2**30
    return C.within(f"batch {batch} checkpointed, bf16 eager", gib, 16.0, " GiB")


def row_functions() -> dict[int, Callable[[Path, bool], Checks]]:
    import acceptance_data_rows as data_rows

    return {1: row_1, 2: row_2, 3: row_3, 4: data_rows.row_4, 5: data_rows.row_5, 6: row_6,
            7: row_7}
