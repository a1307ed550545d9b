"""A run's plan before it starts (`--dry-run`): what it will read, train, need and cost.

The tasks build a `Plan` by calling, one by one, the functions their run calls before its
first step (the data's `build_data`, the model's factory, `RunSetup`'s resume decision,
`plan_steps`), each under `Plan.check`, so that every reason the run would stop for is
collected, not just the first, in the words the run would use. Nothing touches an
accelerator and nothing is written: the run directory is only looked at, the model is
built on the meta device, and data that the run would first build or count (the demo set,
tars without recorded counts) is planned from what can be read without writing a cache.

`plan_steps` is the training loop's own step plan (`Trainer` calls it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cratemae.checkpoints.resolve import check_checkpoint_dir
from cratemae.data import SplitData, build_data, eval_transform
from cratemae.errors import CrateMAEError
from cratemae.guard import check_output
from cratemae.recipe import Recipe
from cratemae.recipe.schema import DataSection
from cratemae.train.lock import lock_holder
from cratemae.train.memory import (
    ERROR,
    Forward,
    MemoryEstimate,
    measure_activations,
    state_bytes,
)
from cratemae.train.optim import peak_lr
from cratemae.train.setup import RunSetup

__all__ = [
    "Plan",
    "StepPlan",
    "estimate_memory",
    "plan_data",
    "plan_memory",
    "plan_model",
    "plan_run_dir",
    "plan_schedule",
    "plan_steps",
    "unbuilt_demo_classes",
]

GIB = 2**30


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps of a run, and its peak learning rate with where it came from."""

    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    effective_batch: int
    peak_lr: float
    lr_note: str


def plan_steps(recipe: Recipe, batches_per_epoch: int, world: int) -> StepPlan:
    """The steps per epoch (micro-batches // accum_steps), total (epochs, capped by
    max_steps), warm-up and peak lr (`peak_lr` of the effective batch). BadInputError when
    an epoch has fewer micro-batches than one step takes."""
    from cratemae.errors import BadInputError

    accum = recipe.optim.accum_steps
    per_epoch = batches_per_epoch // accum
    if per_epoch == 0:
        raise BadInputError(
            f"data.train: {batches_per_epoch} batch(es) per rank per epoch, fewer than "
            f"optim.accum_steps={accum}: use a smaller data.batch_size or more data")
    total = recipe.schedule.epochs * per_epoch
    if recipe.schedule.max_steps is not None:
        total = min(total, recipe.schedule.max_steps)
    effective = recipe.data.batch_size * accum * world
    lr, note = peak_lr(recipe.optim, effective)
    return StepPlan(accum, per_epoch, total, round(recipe.schedule.warmup_epochs * per_epoch),
                    effective, lr, note)


@dataclass
class Plan:
    """Sections of (key, value, text) rows, and the reasons the run would not start."""

    command: str
    world: int = 1
    rank: int = 0
    sections: dict[str, list[tuple[str, Any, str]]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    # What later sections compute from (set by the task's planner).
    steps: StepPlan | None = None
    samples_per_rank: int | None = None  # per epoch
    model_config: Any = None
    memory: MemoryEstimate | None = None
    checkpoint_bytes: int | None = None
    mask_ratio: float = 0.0
    encoder_only: bool = False  # the GFLOP count leaves out the decoder
    resume_step: int = 0  # the step of the checkpoint the run would continue from

    @property
    def ok(self) -> bool:
        return not self.reasons

    def add(self, section: str, key: str, value: Any, text: str | None = None) -> None:
        self.sections.setdefault(section, []).append(
            (key, value, str(value) if text is None else text))

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run a step of the run's start-up: its error becomes one of the reasons."""
        try:
            yield
        except CrateMAEError as err:
            self.reasons.append(str(err))

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "would_start": self.ok, "reasons": self.reasons,
                "world_size": self.world,
                **{title.lower().replace(" ", "_"): {k: v for k, v, _ in rows}
                   for title, rows in self.sections.items()}}


# --- data --------------------------------------------------------------------------------------
def plan_data(plan: Plan, data: DataSection, *, split: str, img_size: int, seed: int,
              augment: str, labels: bool) -> SplitData | None:
    """`build_data` for this rank, as the task calls it, and the Data rows; where the run
    would first write (build the demo set, cache counted tars), planned without writing."""
    from cratemae.data.demo import DEMO_SIZES, PER_SHARD, demo_dir
    from cratemae.data.folders import INDEX_NAME
    from cratemae.data.shards import Shard, count_tar_samples, is_remote
    from cratemae.data.sources import Source, resolve_source

    spec = data.train if split == "train" else data.val
    name, notes = f"data.{split}", []
    if data.decode == "gpu" and not torch.cuda.is_available():
        data = data.model_copy(update={"decode": "cpu"})  # the run's node has the GPU
        notes.append("decoded on the GPU at run time")
    kw: dict[str, Any] = dict(split=split, img_size=img_size, seed=seed, rank=plan.rank,
                              world_size=plan.world, augment=augment, labels=labels)
    training = split == "train" and augment != "none"
    found: SplitData | None = None
    with plan.check():
        if isinstance(spec, str) and spec.startswith("demo:") and spec.removeprefix(
                "demo:") in DEMO_SIZES and not (demo_dir() / INDEX_NAME).is_file():
            n = DEMO_SIZES[spec.removeprefix("demo:")]
            source = Source(tuple(Shard(f"{spec}/{i}", PER_SHARD)
                                  for i in range(n // PER_SHARD)))
            notes.append(f"built on first use in {demo_dir()}")
            found = SplitData(data, source, training=training, transform=eval_transform(
                img_size, data.mean, data.std), decode_device=None, **_split_kw(kw))
        else:
            source = resolve_source(spec, split)
            if not source.counts_known and not (training and data.epoch_samples):
                local = [s for s in source.shards if s.count is None and not is_remote(s.url)]
                if len(local) < sum(s.count is None for s in source.shards):
                    notes.append("counts unknown: the run reads every pipe:/URL shard once")
                    _raise_unknown(name)
                counted = sum(count_tar_samples(s.url) for s in local)
                known = sum(s.count or 0 for s in source.shards)
                notes.append(f"{len(local)} shards counted by reading their headers")
                data = data.model_copy(update={"epoch_samples": counted + known})
            found = build_data(data, **kw)
        _data_rows(plan, found, split, notes)
    if found is not None and not found.source.shards[0].url.startswith("demo:"):
        with plan.check():  # (the unbuilt demo has no shards to read yet)
            _first_samples(plan, found, split, labels)
    return found


FIRST_SAMPLES = 32  # of the first shard, read and decoded to find a bad one early


def _first_samples(plan: Plan, data: SplitData, split: str, labels: bool) -> None:
    """Read and decode the first samples of the first shard, as the loader's workers do
    (`iter_shard`, then the decoder's checks): a source that cannot be opened is a reason;
    the first bad sample is reported (the run skips bad samples up to
    data.max_bad_fraction)."""
    from cratemae.data.decode import BadSample, image_bytes, load_rgb, open_image, parse_label
    from cratemae.data.shards import iter_shard
    from cratemae.errors import BadInputError

    shard = data.source.shards[0]
    hi = min(FIRST_SAMPLES, shard.count) if shard.count is not None else FIRST_SAMPLES
    read, bad, missing = 0, None, None
    for sample in iter_shard(shard, 0, hi, pad=False):
        if sample.missing is not None:  # the shard could not deliver it
            missing = missing or sample.missing
            continue
        read += 1
        try:
            load_rgb(open_image(image_bytes(sample)))
            if labels:
                parse_label(sample)
        except (BadSample, BadInputError) as err:
            bad = bad or f"{sample.shard}: {sample.key!r}: {err}"
    if read == 0 and hi:
        raise BadInputError(f"data.{split}: {shard.url}: not one sample could be read"
                            + (f" ({missing})" if missing else ""))
    plan.add("Data", f"{split}_first_samples", {"read": read, "first_bad": bad},
             f"{read} of {shard.name} read and decoded: "
             + (f"first bad sample {bad}" if bad else "all good"))


def _split_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k not in ("augment",)}


def _raise_unknown(name: str) -> None:
    from cratemae.errors import BadInputError

    raise BadInputError(f"{name}: the sample counts of its pipe:/URL shards are unknown and "
                        "the dry run does not stream them: give data.epoch_samples, or write "
                        "the shards with cratemae shard (which records them)")


def _data_rows(plan: Plan, data: SplitData, split: str, notes: list[str]) -> None:
    first = data.plan(0)
    shards = data.source.shards
    total = sum(s.count or 0 for s in shards)
    plan.add("Data", split, {"shards": len(shards), "samples": total},
             f"data.{split}: {len(shards):,} shards, {total:,} samples"
             + (f" ({'; '.join(notes)})" if notes else ""))
    if not data.training:
        plan.add("Data", f"{split}_per_rank", first.num_samples,
                 f"{first.num_samples:,} samples in {first.num_batches:,} batches")
        return
    plan.samples_per_rank = first.num_samples
    per_epoch = first.num_samples * plan.world
    plan.add("Data", "samples_per_epoch", per_epoch,
             f"{per_epoch:,} ({total - per_epoch:,} dropped: whole batches on every rank)"
             if first.mode == "exact" else f"{per_epoch:,} ({first.mode})")
    plan.add("Data", "per_rank", first.num_samples,
             f"{first.num_samples:,} samples, {first.num_batches:,} batches of "
             f"{first.batch_size} (rank {plan.rank} of {plan.world})")


# --- run directory ------------------------------------------------------------------------------
def plan_run_dir(plan: Plan, setup: RunSetup, *, flag: str = "--out") -> Path | None:
    """Where the run writes, whether it can, whether another run holds it, and where
    `RunSetup` would resume from (and whether `restore_run` would take the recipe)."""
    from cratemae.train.state import _check_recipe

    where = setup.run_dir
    plan.add("Run directory", "path", str(where))
    with plan.check():
        check_output(where, kind="dir", flag=flag)
        plan.add("Run directory", "writable", True, "yes" + ("" if where.exists() else
                                                             " (created at the start)"))
    holder = lock_holder(where) if where.is_dir() else None
    plan.add("Run directory", "locked_by", holder, holder or "no other run")
    if holder is not None:
        plan.reasons.append(f"{where}: another run is writing into this directory ({holder}); "
                            f"give another --out, or wait for it to end")
    found: Path | None = None
    with plan.check():
        found = setup.decide_resume()
        if found is None:
            plan.add("Run directory", "resume_from", None,
                     "fresh start" if setup.resume is not None else "never resumes")
            return None
        meta = check_checkpoint_dir(found, verify_hashes=False)
        position = meta.get("data_position", {})
        plan.add("Run directory", "resume_from",
                 {"path": str(found), "step": meta["step"], "epoch": position.get("epoch")},
                 f"{found} (step {meta['step']:,}, epoch {position.get('epoch')}, "
                 f"batch {position.get('batch')})")
        _check_recipe(meta.get("recipe_toml", ""), setup.recipe, found)
        plan.resume_step = int(meta["step"])
    return found


# --- model, memory, schedule, time ---------------------------------------------------------------
def unbuilt_demo_classes(data: DataSection) -> int | None:
    """The demo's number of classes when data.train or data.val names the demo set and it
    is not built yet (the run builds it; the plan must not), else None."""
    from cratemae.data.demo import CLASSES, demo_dir
    from cratemae.data.folders import INDEX_NAME

    specs = [s for s in (data.train, data.val) if isinstance(s, str)]
    demo = any(s.startswith("demo:") for s in specs)
    return len(CLASSES) if demo and not (demo_dir() / INDEX_NAME).is_file() else None


def estimate_memory(model: torch.nn.Module, forward: Forward, recipe: Recipe, *,
                    average: bool = False) -> MemoryEstimate:
    """`MemoryEstimate` of `model` (on the CPU; its values unused) training with
    `forward`'s loss at the recipe's batch, precision and optimizer."""
    acts = measure_activations(model, forward, recipe.run.precision)
    return MemoryEstimate(*state_bytes(model, recipe.optim.name, average=average), acts,
                          recipe.data.batch_size, recipe.run.precision)


def plan_model(plan: Plan, model: torch.nn.Module, name: str, *, mask_ratio: float = 0.0,
               encoder_only: bool = False) -> None:
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params) - trainable
    plan.model_config, plan.mask_ratio = getattr(model, "config", None), mask_ratio
    plan.encoder_only = encoder_only
    plan.add("Model", "preset", name)
    plan.add("Model", "parameters", {"trainable": trainable, "frozen": frozen},
             f"{trainable / 1e6:,.2f} M trainable, {frozen / 1e6:,.2f} M frozen")


def plan_memory(plan: Plan, estimate: MemoryEstimate, checkpointing: bool,
                gpu_memory: float | None) -> None:
    plan.memory = m = estimate
    plan.add("Memory", "state_bytes", m.state(),
             f"{_size(m.state())}: weights {_size(m.weights)}"
             + (f" + average {_size(m.average)}" if m.average else "")
             + f" + gradients {_size(m.grads)} + optimizer {_size(m.optimizer)}")
    for ckpt in (False, True):
        act = m.activations.at(m.batch, ckpt)
        plan.add("Memory", "activations_checkpointed_bytes" if ckpt else "activations_bytes",
                 act, f"{_size(act)} at batch {m.batch} {'with' if ckpt else 'without'} "
                 f"grad checkpointing{' (as set)' if ckpt == checkpointing else ''}")
    total = m.total(checkpointing)
    plan.add("Memory", "peak_bytes", total,
             f"{_size(total)} per rank, +/-{ERROR:.0%} ({m.precision}; the CUDA context, "
             "about 0.5 GiB, comes on top)")
    plan.add("Memory", "method", "saved-tensor bytes at batch 2 and 4, fake tensors",
             "state counted exactly; activations: the bytes autograd saves in the model's "
             "forward at batches 2 and 4 under the recipe's autocast, on fake tensors (no "
             "arithmetic), linear in the batch")
    if gpu_memory is not None:
        budget = gpu_memory * GIB
        fits = {ck: m.largest_batch(budget, ck) for ck in (False, True)}
        plan.add("Memory", "largest_batch", {"plain": fits[False], "checkpointed": fits[True]},
                 f"{fits[False]:,} without, {fits[True]:,} with grad checkpointing, in "
                 f"{gpu_memory:g} GiB")
        if total > budget:
            plan.reasons.append(
                f"memory: about {_size(total)} per rank at data.batch_size {m.batch} does "
                f"not fit --gpu-memory {gpu_memory:g} GiB; the largest batch that does is "
                f"{fits[checkpointing]}"
                + ("" if checkpointing else f" ({fits[True]} with run.grad_checkpointing)"))


def _size(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:,.1f} MiB"


def plan_schedule(plan: Plan, recipe: Recipe, steps: StepPlan) -> None:
    plan.steps = steps
    r = recipe.run
    plan.add("Schedule", "lr", steps.peak_lr, steps.lr_note)
    plan.add("Schedule", "steps", {"per_epoch": steps.steps_per_epoch, "total": steps.total_steps,
                                   "warmup": steps.warmup_steps, "accum": steps.accum},
             f"{steps.total_steps:,} ({steps.steps_per_epoch:,} per epoch x "
             f"{recipe.schedule.epochs} epochs"
             + (", capped by schedule.max_steps" if recipe.schedule.max_steps is not None
                and recipe.schedule.max_steps < recipe.schedule.epochs * steps.steps_per_epoch
                else "")
             + f"), {steps.warmup_steps:,} warm-up, effective batch {steps.effective_batch:,}")
    cadence = [f"every {r.checkpoint_every_minutes:g} min"]
    if r.checkpoint_every_steps:
        cadence.append(f"every {r.checkpoint_every_steps:,} steps")
    if r.keep_every_epochs:
        cadence.append(f"every {r.keep_every_epochs} epochs (kept)")
    epochs = math.ceil(steps.total_steps / steps.steps_per_epoch)
    kept = r.keep_last + (epochs // r.keep_every_epochs if r.keep_every_epochs else 0)
    plan.add("Schedule", "checkpoints", {"kept_at_most": kept},
             ", ".join(cadence) + f" and at the end; at most {kept} kept (run.keep_last "
             f"{r.keep_last}" + (", plus the epochs'" if r.keep_every_epochs else "") + ")")
    if plan.checkpoint_bytes is not None:
        per = plan.checkpoint_bytes
        plan.add("Schedule", "disk_bytes", {"per_checkpoint": per, "run": kept * per},
                 f"{_size(per)} per checkpoint, {_size(kept * per)} for the run")
