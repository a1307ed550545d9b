"""The seven rows of the GPU acceptance run (`benchmarks/acceptance.py`), each as a user runs
the product: the `cratemae` command (in this process through its Typer app, or as a process
where the row is about processes: SIGTERM, torchrun) or the public API.

Each row is `row_N(work, rehearse) -> list[Check]`. With `rehearse` the same row runs on the
CPU at tiny sizes (a 32-wide, 1-layer model, batch 8, a few steps) and every assertion that
only a GPU can make is a `needs CUDA` check, never left out.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
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
# GPU decode vs Pillow, mean |difference| per image in levels of 255: nvJPEG and libjpeg-turbo
# round the IDCT and upsample chroma differently (+-1-2 levels on most pixels), and the device
# resize is not Pillow's (tests/test_data_gpu.py allows 0.05 of a std, ~3 levels).
PIXEL_TOL = 3.0
# embed on CUDA (fp32) vs the CPU: relative Frobenius error of the features; cuDNN runs the
# patch-embedding convolution in TF32 (~1e-3 relative). CPU vs CPU (rehearsal): the same code.
EMBED_TOL_CUDA, EMBED_TOL_CPU = 5e-3, 1e-6


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
        checks.append(C.Check(f"{name} check", C.PASS, f"grad err "
                              f"{result['checks']['fast']['grad_rel_err']:.1e}", "allowed"))
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


# --- row 4: GPU JPEG decode against Pillow --------------------------------------------------
def row_4(work: Path, rehearse: bool) -> Checks:
    """JPEG shards written by `cratemae shard`, read back; each image cropped, resized and
    flipped by the device path (nvJPEG) and by the CPU path (Pillow) with the same boxes."""
    import numpy as np
    import torch
    from PIL import Image

    from cratemae.data import pretrain_transform
    from cratemae.data.batch import EncodedBatch

    n, size, img = (32, 64, 32) if rehearse else (256, 256, 224)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth random images, so JPEG is not all noise
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        folder = work / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(
            folder / f"{i:04d}.jpg", quality=90)
    code = cli("shard", work / "src", work / "shards")
    blobs = [f.read() for t in sorted((work / "shards").glob("*.tar"))
             for f in _members(t, ".jpg")]
    checks = [C.exit_code_is("shard", code, 0),
              C.Check("JPEGs read back", C.PASS if len(blobs) == n else C.FAIL, str(len(blobs)),
                      str(n))]
    tf = pretrain_transform(img, (0.3, 1.0), mean, std)
    items = []
    for blob in blobs:
        box, flip = tf.box(size, size, rng)
        items.append(((blob, tuple(float(round(v)) for v in box), flip), 0))
    batch = EncodedBatch.pack(items, None, 0, {})
    start = time.perf_counter()
    pil = torch.stack([tf.crop(Image.open(io.BytesIO(b)).convert("RGB"),
                               tuple(int(v) for v in box), flip).float()
                       for (b, box, flip), _ in items])  # (N, 3, img, img) in 0..255
    pil_rate = n / (time.perf_counter() - start)
    device = "cpu" if rehearse else "cuda"
    _device_decode(batch, device, img, mean, std)  # warm-up (nvJPEG handle, kernels)
    start = time.perf_counter()
    dev = _device_decode(batch, device, img, mean, std)
    dev_rate = n / (time.perf_counter() - start)
    worst = float((dev - pil).abs().mean(dim=(1, 2, 3)).max())
    name = "CPU stand-in (libjpeg + device resize) vs Pillow" if rehearse else "nvJPEG vs Pillow"
    checks += [C.within(f"{name}, worst image mean |diff|", worst, PIXEL_TOL, " levels",
                        miss=C.FAIL),
               C.Check("images/s", C.PASS, f"Pillow {pil_rate:,.0f}, {device} "
                       f"{dev_rate:,.0f} ({n} at {size} px -> {img})")]
    if rehearse:
        checks.append(C.needs_cuda("nvJPEG", "gpu_decode_batch on the device"))
    return checks


def _members(path: Path, suffix: str):
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                yield tar.extractfile(member)


def _device_decode(batch, device: str, img: int, mean, std):
    """(N, 3, img, img) float in 0..255, on the CPU: gpu_decode_batch on CUDA; on the CPU its
    steps with torchvision's CPU decoder (the rehearsal's stand-in: everything but nvJPEG)."""
    import torch

    from cratemae.data import gpu_decode_batch
    from cratemae.data.gpu import _crop_resize, _decode

    if device == "cuda":
        out = gpu_decode_batch(batch, "cuda", img_size=img, mean=mean, std=std).images
        torch.cuda.synchronize()
        if out.dtype == torch.uint8:  # 0..255, normalised later by the batch
            return out.cpu().float()
        m, s = (torch.tensor(v).view(3, 1, 1) for v in (mean, std))
        return (out.cpu() * s + m) * 255  # normalised -> 0..255
    offs = batch.offsets.tolist()
    images = _decode([batch.data[offs[i]:offs[i + 1]] for i in range(len(batch))],
                     torch.device("cpu"))
    out = torch.stack([_crop_resize(x, batch.boxes[i].tolist(), img)
                       for i, x in enumerate(images)])  # (N, 3, img, img)
    return torch.where(batch.flips.view(-1, 1, 1, 1), out.flip(-1), out)


# --- row 5: embed, probe, finetune ----------------------------------------------------------
def row_5(work: Path, rehearse: bool) -> Checks:
    """A short pre-training, then `cratemae embed` of demo:val on CUDA and on the CPU, and
    `probe` and `finetune` of the checkpoint for a few steps on the run's device."""
    from cratemae.eval.embeddings import read_embeddings

    ckpt = work / "pretrain"
    sizes = TINY if rehearse else ["data.num_workers=4"]
    code = cli("pretrain", "demo", *sets(*sizes, *COMMON, "schedule.max_steps=4"),
               "--out", ckpt)
    checks = [C.exit_code_is("pretrain", code, 0)]
    here = "cpu" if rehearse else "cuda"
    # The rehearsal's images: 2 x 32 of the demo's val split would do, but reading 6,000
    # demo images is what costs; a 64-image folder of two classes (train and val) instead.
    data = _folder(work / "images", 32) if rehearse else None
    split = [str(data / "val")] if data else ["demo:val"]
    files = [work / f"first-{here}.st", work / "second-cpu.st"]  # two files, also on a CPU
    for device, path in zip((here, "cpu"), files, strict=True):
        code = cli("embed", *split, "--checkpoint", ckpt, "--out", path,
                   "--device", device, "--precision", "fp32", "--workers", "0", "--overwrite")
        checks.append(C.exit_code_is(f"embed on {device}", code, 0))
    if all(c.status == C.PASS for c in checks):
        a, b = (read_embeddings(path)[0] for path in files)
        err = float((a - b).norm() / b.norm()) if a.shape == b.shape else float("inf")
        tol = EMBED_TOL_CPU if rehearse else EMBED_TOL_CUDA
        checks.append(C.within(f"features {here} vs cpu ({a.shape[0]} images), rel. err", err,
                               tol, miss=C.FAIL))
    if rehearse:
        checks.append(C.needs_cuda("embed on cuda", "the rehearsal compares CPU with CPU"))
    small = ([f'data.train="{data / "train"}"', f'data.val="{data / "val"}"',
              "data.num_workers=0", "data.batch_size=16"] if data else ["data.num_workers=4"])
    code = cli("probe", "probe/demo", "--checkpoint", ckpt, "--out", work / "probe",
               *sets(*small, "probe.max_iter=20", "probe.weight_decays=[1e-3]",
                     "run.loggers=[]"))
    checks.append(C.exit_code_is(f"probe on {here}", code, 0))
    code = cli("finetune", "finetune/demo", "--checkpoint", ckpt, "--out", work / "finetune",
               *sets(*small, "schedule.max_steps=3", "run.log_every=1", "run.loggers=[]"))
    checks.append(C.exit_code_is(f"finetune on {here}", code, 0))
    return checks


def _folder(root: Path, size: int, per_class: int = 16) -> Path:
    """train/ and val/ folders of two classes of smooth random PNG images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BICUBIC).save(
                    root / split / cls / f"{i:03d}.png")
    return root


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


ROW_FUNCTIONS: dict[int, Callable[[Path, bool], Checks]] = {
    1: row_1, 2: row_2, 3: row_3, 4: row_4, 5: row_5, 6: row_6, 7: row_7}
