"""The recipe: every setting of a run, as pydantic models that refuse unknown keys.

Sections follow the data flow: `model` -> `data` -> `optim`/`schedule` -> `run`; `probe` and
`finetune` hold what only those commands read (they take the model from the checkpoint, so of
`model` they use only `img_size`). A field
marked `safe_to_change` in its `json_schema_extra` may differ when a run is resumed (for
example the number of epochs); any other change makes resume refuse.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from cratemae.model.config import PRESETS, CrateMAEConfig

__all__ = [
    "POOL_ALIASES",
    "DataSection",
    "FinetuneSection",
    "ModelSection",
    "OptimSection",
    "ProbeSection",
    "Recipe",
    "RunSection",
    "SchedSection",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # MAE's fine-tuning RandAugment (timm's syntax)
DEFAULT_RE_PROB = 0.25  # MAE's random erasing
MODEL_NAMES = tuple(PRESETS)

log = logging.getLogger("cratemae")

PositiveInt = Annotated[int, Field(gt=0)]
# Sizes that allocate memory or start processes, capped far above any real run so that a typo
# (batch_size = 100000000000) is refused with the limit instead of hanging the machine.
BatchSize = Annotated[int, Field(gt=0, le=2**20)]
Workers = Annotated[int, Field(ge=0, le=1024)]
ClassCount = Annotated[int, Field(gt=0, le=2**24)]
SAFE = {"safe_to_change": True}


def _is_tuple(annotation: Any) -> bool:
    """True for `tuple[...]`, also inside `Annotated[...]` or `... | None`."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return True
    return any(_is_tuple(arg) for arg in typing.get_args(annotation)
               if origin is not Literal and not isinstance(arg, (str, int, float)))


class _Section(BaseModel):
    """Strict: a value must have the field's type (no `true` for a batch size, no "8" for a
    number, no 1 for a flag); numbers must be finite; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True,
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _arrays_are_tuples(cls, data: Any) -> Any:
        """TOML has arrays, not tuples: an array given for a tuple field is taken as one
        (its items still checked strictly)."""
        if not isinstance(data, dict):
            return data
        return {k: tuple(v) if isinstance(v, list) and k in cls.model_fields
                and _is_tuple(cls.model_fields[k].annotation) else v for k, v in data.items()}


class _ModelSectionBase(_Section):
    def config_overrides(self) -> dict[str, Any]:
        """The fields to pass to `create_model(name, **overrides)`: those the recipe sets."""
        skip = {"name", "mask_ratio"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


def _model_section_fields() -> dict[str, Any]:
    """The model section's keys: `name` (a preset), every field of `CrateMAEConfig` (unset:
    the preset's value), with the bounds its metadata declares, and the mask ratio."""
    hints = typing.get_type_hints(CrateMAEConfig)
    # These two have no source line to carry a comment: their help is their description.
    fields: dict[str, Any] = {"name": (Literal[MODEL_NAMES], Field(
        "crate_mae_base", description="The preset (crate_mae_* or MAE's mae_vit_*) whose shape "
        "the model keys override; an unset key takes the preset's value."))}
    for f in dataclasses.fields(CrateMAEConfig):
        bounds = {k: v for k, v in f.metadata.items() if k in ("gt", "ge", "le")}
        kind = Annotated[hints[f.name], Field(**bounds)] if bounds else hints[f.name]
        fields[f.name] = (kind | None, None)
    fields["mask_ratio"] = (Annotated[float, Field(gt=0, lt=1)], Field(
        0.75, description="Pre-training: the fraction of each image's patches masked (hidden "
        "from the encoder and reconstructed by the decoder)."))
    return fields


ModelSection = create_model(
    "ModelSection",
    __base__=_ModelSectionBase,
    __module__=__name__,
    __doc__="Which preset, plus optional overrides of `cratemae.model.CrateMAEConfig` fields "
            "(declared there: names, types and bounds), and the pre-training mask ratio.",
    **_model_section_fields(),
)


class DataSection(_Section):
    """Where the images come from and how they are batched (per device)."""

    # Training images: shard pattern(s), folder(s) or demo:train (cratemae.data.sources).
    train: str | list[str] | None = None
    # Validation images, same forms: probe and finetune score on them; unset: none.
    val: str | list[str] | None = None
    batch_size: BatchSize = 64  # images per device per micro-step (see optim.accum_steps)
    # DataLoader worker processes per rank, each reading its own stream of shards; 0: read in
    # the main process. Not safe to change on resume: another count reads the samples of an
    # epoch in another order (the run would not repeat itself exactly).
    num_workers: Workers = 8
    # Draw shards with replacement (large clusters): every rank reads `epoch_samples / world`.
    resampled: bool = False
    # Samples per epoch over all ranks, for shards of unknown counts or data.resampled; unset:
    # the shards' sample counts (counted if unknown). Known counts other than it: an error.
    epoch_samples: PositiveInt | None = None
    # Samples held per stream to shuffle within it when training; 0 or 1: no shuffling.
    shuffle_buffer: Annotated[int, Field(ge=0, le=2**20)] = 1000
    # RandomResizedCrop's (low, high) fraction of the image area kept, in (0, 1].
    crop_scale: tuple[float, float] = (0.2, 1.0)
    # Per-channel (R, G, B) mean subtracted from pixels in [0, 1] (ImageNet's by default).
    mean: tuple[float, float, float] = IMAGENET_MEAN
    # Per-channel (R, G, B) standard deviation that pixels are divided by, each above 0.
    std: tuple[float, float, float] = IMAGENET_STD
    # Fine-tuning's augmentation policy when finetune.randaugment = true, in timm's syntax
    # ("rand-n2-m5-p1.0", "original", "augmix-m5"; "": none, colour jitter 0.4 instead).
    auto_augment: str = DEFAULT_AUTO_AUGMENT
    # Probability of random erasing per image when finetune.randaugment = true; 0: never.
    re_prob: Annotated[float, Field(ge=0, le=1)] = DEFAULT_RE_PROB
    # Fraction of unreadable samples tolerated (checked from 200 seen on); above: the run
    # stops, naming the worst shards.
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    # "gpu" decodes JPEGs with nvJPEG on the device when the CPUs cannot keep up.
    decode: Literal["cpu", "gpu"] = "cpu"

    @field_validator("crop_scale")
    @classmethod
    def _ordered_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("crop_scale must be (low, high) with 0 < low <= high <= 1")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(x > 0 for x in v):
            raise ValueError("every std must be above 0 (images are divided by it)")
        return v


class OptimSection(_Section):
    """AdamW (or SGD / LARS for MAE's linear probe). `lr` (absolute) wins over `base_lr`
    (scaled by effective batch / 256)."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"  # the optimizer (LARS: MAE's probe)
    # Peak learning rate per 256 images: peak = base_lr x (batch x accum_steps x ranks) / 256.
    base_lr: Annotated[float, Field(gt=0)] = 1.5e-4
    lr: Annotated[float, Field(gt=0)] | None = None  # absolute peak lr; unset: from base_lr
    min_lr: Annotated[float, Field(ge=0)] = 0.0  # lr at the end of the cosine decay
    # Decoupled weight decay of the weight matrices and tokens (not norms or biases); 0: none.
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's (beta1, beta2), each in [0, 1)
    # Largest total gradient norm (L2 over all parameters) before a step; unset: no clipping.
    clip_grad: Annotated[float, Field(gt=0)] | None = None
    # Micro-batches whose gradients add up to one optimizer step; 1: no accumulation.
    accum_steps: Annotated[int, Field(gt=0, le=2**16)] = 1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # SGD and LARS only

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must each be in [0, 1)")
        return v


class SchedSection(_Section):
    """Length of the run and of the warm-up, in epochs; `max_steps` caps optimizer steps."""

    # Passes over data.train (data.epoch_samples each when set); the lr's cosine spans them.
    epochs: PositiveInt = Field(800, json_schema_extra=SAFE)
    # Linear warm-up of the learning rate from 0, in epochs (fractions allowed); 0: none.
    warmup_epochs: Annotated[float, Field(ge=0)] = 40
    # Stop after this many optimizer steps (the cosine then ends there); unset: all epochs.
    max_steps: PositiveInt | None = Field(None, json_schema_extra=SAFE)


class RunSection(_Section):
    """Where the run writes, how it logs and checkpoints, and its numerics.

    A step whose loss is not finite (NaN, inf) on any rank is skipped by every rank and
    counted. When `nan_patience` of the last `nan_window` steps were skipped (no window:
    `nan_patience` in a row), the run recovers as `nan_recovery` says: "rollback" reloads the
    run's newest complete checkpoint (weights, optimizer, scaler, weight average, RNG states,
    data position) on every rank and goes on with its learning rate times `nan_lr_factor` from
    then on (an exact rollback repeats the same batches and masks: at the same learning rate
    it would diverge again); "rollback_fp32" also trains in float32 for the rest of the run;
    "stop" ends the run (exit status 1) naming the last good checkpoint. After
    `nan_max_recoveries` rollbacks the next one stops the run instead. The factor and the
    float32 switch are saved in later checkpoints, so a resumed run keeps them.
    `max_nonfinite = N` (the old key) reads as nan_patience = N, nan_recovery = "stop".
    """

    # The run directory of pretrain (--out wins); probe and finetune use it only when set.
    out_dir: str = Field("runs/pretrain", min_length=1, json_schema_extra=SAFE)
    seed: int = 0  # seeds weights, masks, data order and evaluation subsets (plus the rank)
    # Autocast on a GPU: "bf16", "fp16" (with a gradient scaler) or "fp32"; a CPU runs fp32.
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    compile: bool = Field(False, json_schema_extra=SAFE)  # torch.compile the model's step
    # Recompute each layer in the backward pass instead of keeping its activations: the
    # same gradients (to float32 rounding), less memory, one more forward pass of compute.
    grad_checkpointing: bool = Field(False, json_schema_extra=SAFE)
    # Optimizer steps between lines of training loss and lr (log and metrics.jsonl).
    log_every: PositiveInt = Field(50, json_schema_extra=SAFE)
    # Also checkpoint every this many optimizer steps; unset: by minutes and epochs only.
    checkpoint_every_steps: PositiveInt | None = Field(None, json_schema_extra=SAFE)
    # Checkpoint when this many minutes have passed since the last save (wall clock).
    checkpoint_every_minutes: Annotated[float, Field(gt=0)] = Field(30, json_schema_extra=SAFE)
    # Checkpoints kept besides those of keep_every_epochs: the newest this many.
    keep_last: PositiveInt = Field(2, json_schema_extra=SAFE)
    # Also save and keep for good the checkpoint at the end of every this many epochs.
    keep_every_epochs: PositiveInt | None = Field(None, json_schema_extra=SAFE)
    # Skipped steps (loss not finite) that set off nan_recovery, in a row or in nan_window.
    nan_patience: PositiveInt = Field(20, json_schema_extra=SAFE)
    # Count nan_patience skips within this many last steps; unset: nan_patience in a row.
    nan_window: PositiveInt | None = Field(None, json_schema_extra=SAFE)
    # What too many skipped steps do: "rollback" to the newest checkpoint, also in float32
    # ("rollback_fp32"), or "stop" the run (exit 1).
    nan_recovery: Literal["rollback", "rollback_fp32", "stop"] = Field(
        "rollback", json_schema_extra=SAFE)
    # Rollbacks allowed in one run; the next one stops the run instead; 0: stop at once.
    nan_max_recoveries: Annotated[int, Field(ge=0)] = Field(3, json_schema_extra=SAFE)
    # Multiplies the learning rate at each rollback, for the rest of the run (0.5 twice: 0.25).
    nan_lr_factor: Annotated[float, Field(gt=0, le=1)] = Field(0.5, json_schema_extra=SAFE)
    # Pre-training's validation every this many steps and at the end; unset: none. It gives
    # val_loss, k-NN top-1, per-layer coding rate and sparsity and samples/ pictures, on
    # `eval_images` images of data.val drawn once by the seed (the same ones at every
    # evaluation and on resume; see cratemae.eval.validation `subset_positions`).
    eval_every_steps: PositiveInt | None = Field(None, json_schema_extra=SAFE)
    # Images of data.val (and of data.train for the k-NN) in each pre-training validation.
    eval_images: Annotated[int, Field(gt=0, le=2**24)] = Field(1024, json_schema_extra=SAFE)
    # Where the curves go besides metrics.jsonl (always written): "tensorboard"
    # (RUN_DIR/tensorboard/), "wandb" (the `wandb` extra); []: none.
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = Field(
        ("tensorboard",), json_schema_extra=SAFE)
    # Rendezvous host for `srun` launches without torchrun; unset: MASTER_ADDR, else the first node.
    master_addr: str | None = Field(None, json_schema_extra=SAFE)
    # Rendezvous TCP port for those launches; unset: MASTER_PORT, else from the job id.
    master_port: Annotated[int, Field(gt=0, lt=65536)] | None = Field(None, json_schema_extra=SAFE)

    @model_validator(mode="before")
    @classmethod
    def _old_max_nonfinite(cls, data: Any) -> Any:
        """`max_nonfinite = N` (before `nan_patience`; every saved recipe.toml of that time
        holds it) meant: N non-finite losses in a row stop the run."""
        if not isinstance(data, dict) or "max_nonfinite" not in data:
            return data
        data = dict(data)
        old = data.pop("max_nonfinite")
        if data.setdefault("nan_patience", old) != old:
            raise ValueError("max_nonfinite is the old name of nan_patience: give only "
                             "nan_patience")
        data.setdefault("nan_recovery", "stop")
        return data

    @model_validator(mode="after")
    def _window_holds_patience(self) -> RunSection:
        if self.nan_window is not None and self.nan_window < self.nan_patience:
            raise ValueError(f"nan_window ({self.nan_window}) must be at least nan_patience "
                             f"({self.nan_patience}): fewer steps can never hold that many")
        return self


Pool = Literal["token", "avg"]
# The pool names before timm's (`global_pool="token"|"avg"`), still read with a warning.
POOL_ALIASES = {"cls": "token", "mean": "avg"}


def _pool_alias(value: Any, key: str) -> Any:
    """`cls`/`mean` -> `token`/`avg`, with one deprecation line naming the key."""
    if isinstance(value, str) and value in POOL_ALIASES:
        new = POOL_ALIASES[value]
        log.warning(f'{key} = "{value}" is deprecated: write "{new}" (timm\'s name); '
                    f'read as "{new}"')
        return new
    return value


class ProbeSection(_Section):
    """`cratemae probe`: a linear classifier on the frozen encoder's features.

    protocol "features" (the authors'): features of the centre-cropped image, extracted once
    and cached, then multinomial logistic regression (L-BFGS) for each weight decay in
    `weight_decays`, chosen on a held-out `holdout_fraction` of data.train, refitted on all of
    it and scored on data.val. protocol "mae" (MAE's main_linprobe.py): BatchNorm without
    affine + linear head trained by `optim` (LARS) for `schedule.epochs` on augmented images.
    """

    # "features" (the authors': cached features + L-BFGS) or "mae" (MAE's LARS-trained head).
    protocol: Literal["features", "mae"] = "features"
    pool: Pool = "token"  # "token": the CLS token; "avg": the mean of the patch tokens
    layer: int = -1  # encoder layer whose output (after the final norm) is pooled; -1: last
    num_classes: ClassCount | None = None  # unset: the number of class names of data.train
    # L2 penalties tried by protocol "features", the best chosen on the held-out part.
    weight_decays: tuple[Annotated[float, Field(ge=0)], ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    # Fraction of data.train held out to choose the weight decay (protocol "features").
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    max_iter: PositiveInt = 500  # L-BFGS iterations per fit (protocol "features")
    # Where extracted features are cached; unset: $CRATEMAE_CACHE, else ~/.cache/cratemae.
    cache_dir: str | None = Field(None, json_schema_extra=SAFE)

    @field_validator("pool", mode="before")
    @classmethod
    def _old_pool_names(cls, v: Any) -> Any:
        return _pool_alias(v, "probe.pool")

    @field_validator("weight_decays")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("give at least one weight decay")
        return v


class FinetuneSection(_Section):
    """`cratemae finetune`: the encoder plus a new linear head, all trained.

    Layer-wise lr decay scales the lr of layer i (0: patch embedding and CLS token) by
    layer_decay^(depth + 1 - i); the final norm goes with the last layer, the head gets 1
    (timm's `param_groups_layer_decay` over the encoder's `group_matcher`). Mixup /
    cutmix (timm) are off when both alphas are 0; EMA of the weights is off when `ema` is
    false. data.val is evaluated every `eval_every_epochs` and at the end; the best weights
    are kept in `best/` next to the usual last checkpoints.
    """

    num_classes: ClassCount | None = None  # unset: the number of class names of data.train
    pool: Pool = "token"  # head input: "token", the CLS token; "avg", mean of patch tokens
    # Layer-wise lr decay: layer i's lr is scaled by layer_decay^(depth + 1 - i); 1: none.
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 0.75
    # Stochastic depth: each block's MSSA branch is dropped with a rate rising linearly
    # from 0 to this at the last block (timm's ViT; MAE fine-tunes ViT-B with 0.1).
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Weight moved from the true class to all classes uniformly in the targets; 0: none.
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # true: timm's RandAugment + random erasing (the loader's fine-tuning transform); false:
    # RandomResizedCrop(scale = data.crop_scale) + flip only (small images, short runs).
    randaugment: bool = True
    mixup: Annotated[float, Field(ge=0)] = 0.8  # mixup's Beta(alpha, alpha); 0: no mixup
    cutmix: Annotated[float, Field(ge=0)] = 1.0  # cutmix's Beta(alpha, alpha); 0: no cutmix
    # Probability that a batch is mixed at all (mixup or cutmix); 0: never.
    mixup_prob: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Probability of cutmix rather than mixup for a mixed batch when both are on.
    mixup_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5
    ema: bool = False  # keep an exponential moving average of the weights
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.9999  # the average's decay per step
    # Validate on data.val (and keep the best weights) every this many epochs and at the end.
    eval_every_epochs: PositiveInt = Field(1, json_schema_extra=SAFE)

    @field_validator("pool", mode="before")
    @classmethod
    def _old_pool_names(cls, v: Any) -> Any:
        return _pool_alias(v, "finetune.pool")


class Recipe(_Section):
    """A whole recipe file. Sections may be omitted; each has defaults."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    schedule: SchedSection = SchedSection()
    run: RunSection = RunSection()
    probe: ProbeSection = ProbeSection()
    finetune: FinetuneSection = FinetuneSection()
