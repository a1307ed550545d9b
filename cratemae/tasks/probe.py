"""Linear probing of a frozen pre-trained encoder, by either of two protocols.

- `features` (the authors'): features of the centre-cropped, unmasked image, extracted once
  over all ranks and cached; multinomial logistic regression for each weight decay of a
  small grid, chosen by a held-out part of data.train, refitted on all of data.train and
  scored on data.val.
- `mae` (MAE's `main_linprobe.py`): BatchNorm without affine + a linear head on the frozen
  features, trained on augmented images by the one training loop (LARS or SGD), and scored
  on data.val at the end.
Both write `probe.json` (top-1/top-5 in percent to 2 decimals, top-5 null with 5 classes or
fewer; the protocol; the checkpoint, by path and SHA-256; the recipe).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratemae.checkpoints import Resume
from cratemae.data import build_data
from cratemae.distributed import dist
from cratemae.distributed.precision import resolve_precision
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.eval.classify import Progress, classify
from cratemae.eval.embeddings import read_probe_pair
from cratemae.eval.features import CACHE_FORMAT, FeatureSet, FeatureSpec, cached_features
from cratemae.eval.labels import check_labels, class_names, resolve_num_classes
from cratemae.eval.logreg import FitStopped, best_of_grid, fit_logreg, select_weight_decay
from cratemae.fs import atomic_write_json
from cratemae.model import CrateEncoder
from cratemae.recipe import Recipe, dump_recipe
from cratemae.rundir import RunFiles
from cratemae.tasks.follow import follow_checkpoint
from cratemae.train.plan import (
    Plan,
    estimate_memory,
    plan_data,
    plan_memory,
    plan_model,
    plan_run_dir,
    plan_schedule,
    plan_steps,
    unbuilt_demo_classes,
)
from cratemae.train.plan_time import Rates, plan_time
from cratemae.train.setup import RunSetup, Source, run_dir_for
from cratemae.train.task import Task
from cratemae.train.trainer import Trainer
from cratemae.weights.load import checkpoint_digest, config_key, load_encoder

__all__ = ["LinearProbeModel", "ProbeResult", "plan_probe", "probe"]

log = logging.getLogger("cratemae")
StageProgress = Callable[[str, int, int], None]  # (what, done, total)
# How the "mae" protocol reads data.train (the run and its plan): cropped, labelled.
MAE_TRAIN_DATA: dict[str, Any] = {"split": "train", "augment": "crop", "labels": True}


@dataclass
class ProbeResult:
    run_dir: Path
    top1: float
    top5: float | None  # None with 5 classes or fewer
    summary: dict[str, Any] = field(default_factory=dict)  # what probe.json holds
    main_process: bool = True


def probe(recipe: Recipe, checkpoint: str | Path | None, *,
          features: tuple[Path, Path] | None = None, run_dir: Path | None = None,
          overwrite: bool = False, recipe_name: str | None = None,
          on_progress: StageProgress | None = None,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> ProbeResult:
    """Probe the encoder of `checkpoint`, or the (train, val) features `cratemae embed`
    wrote (`features`: then no checkpoint is read and no image decoded); write probe.json,
    recipe.toml and log.txt into `run_dir`. The `mae` protocol resumes an interrupted probe
    from the newest checkpoint there.

    `run_dir` defaults to the recipe's run.out_dir when it sets one, else to a directory
    named after the checkpoint's run (`train.setup.default_run_dir`; `recipe_name` joins
    it). A directory that holds the probe of other weights is refused, or with `overwrite`
    replaced. The image size, mean and std are the checkpoint's unless the recipe sets them
    (`tasks.follow.follow_checkpoint`)."""
    p = recipe.probe
    if features is not None and p.protocol != "features":
        raise BadInputError('--features: the "mae" protocol trains on augmented images; '
                            'embeddings files serve probe.protocol = "features"')
    progress = on_progress or (lambda what, done, total: None)
    notes: list[str] = []
    if features is None:
        assert checkpoint is not None
        source = Source(str(checkpoint), checkpoint_digest(checkpoint))
        loaded = load_encoder(checkpoint, recipe.model)
        recipe, notes = follow_checkpoint(recipe, loaded)
        encoder, config = loaded
        depth = encoder.config.depth
        if not -depth <= p.layer < depth:
            raise BadInputError(f"probe.layer = {p.layer}, but the encoder of {checkpoint} "
                                f"has {depth} layers (valid: {-depth}..{depth - 1})")
        num_classes = resolve_num_classes(recipe, p.num_classes, "probe.num_classes")
        img_size, names = encoder.config.img_size, class_names(recipe)
        named = Path(checkpoint)
    else:
        sets, meta = _embedded_sets(features, p.pool, p.layer)
        num_classes = _embedded_classes(meta, sets, p.num_classes)
        sha = meta.get("checkpoint_sha256")
        source = Source(str(meta.get("checkpoint") or sha), sha)
        img_size, names = int(meta.get("img_size", 0)), meta.get("classes")
        named = Path(str(meta.get("checkpoint") or features[0]))
    where = run_dir_for(recipe, named, "probe", out=run_dir, recipe_name=recipe_name,
                        reads=tuple(features or ()))
    recipe = recipe.model_copy(update={"run": recipe.run.model_copy(
        update={"out_dir": str(where)})})  # recipe.toml says where the run went
    with RunSetup(recipe, where, resume=Resume.AUTO, source=source,
                  result=RunFiles(where).probe, overwrite=overwrite) as run:
        with run.open_run_dir():
            for note in notes:
                log.info(note)
            log.info("probing %s (%s protocol, %d classes, %d px), %d process(es) on %s",
                     source.path, p.protocol, num_classes, img_size, run.info.world_size,
                     run.info.device)
            if features is not None:
                details = {**_fit_and_score(recipe, sets, num_classes, run, progress),
                           "features_files": [str(f) for f in features]}
            elif p.protocol == "features":
                details = _features_protocol(recipe, source, encoder, num_classes, run,
                                             progress)
            else:
                details = _mae_protocol(recipe, encoder, config, num_classes, run, on_log)
            summary = {"protocol": p.protocol, "top1": _percent(details.pop("top1")),
                       "top5": _top5(details.pop("top5"), num_classes),
                       **source.fields(), "num_classes": num_classes, "pool": p.pool,
                       "layer": p.layer, "img_size": img_size, **details,
                       "class_names": list(names or []) or None,
                       "recipe": dump_recipe(recipe)}
            if dist.is_main_process():
                atomic_write_json(run.files.probe, summary)
        return ProbeResult(run.run_dir, summary["top1"], summary["top5"], summary,
                           dist.is_main_process())


def _percent(value: float) -> float:
    """A percentage as probe.json holds it: 68.1, not 68.10000000000001."""
    return round(float(value), 2)


def _top5(value: float, num_classes: int) -> float | None:
    """Top-5 means nothing with 5 classes or fewer (always 100%): None then."""
    return _percent(value) if num_classes > 5 else None


def _embedded_sets(files: tuple[Path, Path], pool: str,
                   layer: int) -> tuple[dict[str, FeatureSet], dict[str, Any]]:
    """The train and val features of two `cratemae embed` files, checked to belong together
    (`read_probe_pair`: the same weights, preprocessing, width and class names, finite, and
    not one file twice)."""
    train, val, meta = read_probe_pair(*files, pool=pool, layer=layer)
    return {"train": train, "val": val}, meta


def _embedded_classes(meta: dict[str, Any], sets: dict[str, FeatureSet],
                      wanted: int | None) -> int:
    """probe.num_classes, else the number of classes the train file names, else the largest
    label + 1; every label must fit."""
    classes = meta.get("classes")
    num = wanted or (len(classes) if classes else int(sets["train"].labels.max()) + 1)
    for split, found in sets.items():
        check_labels(found.labels, num, "probe.num_classes", split)
    return num


def _stage(on_progress: StageProgress, what: str) -> Progress:
    return lambda done, total: on_progress(what, done, total)


def _features_protocol(recipe: Recipe, source: Source, encoder: CrateEncoder,
                       num_classes: int, run: RunSetup,
                       on_progress: StageProgress) -> dict[str, Any]:
    p, device = recipe.probe, dist.get_dist_info().device
    spec = FeatureSpec(p.layer, p.pool, encoder.config.img_size,
                       resolve_precision(recipe.run.precision, device))
    digest = source.sha256
    sets = {}
    for split in ("train", "val"):
        key = config_key(format=CACHE_FORMAT, checkpoint=digest, data=getattr(recipe.data, split),
                         img_size=spec.img_size, mean=recipe.data.mean, std=recipe.data.std,
                         layer=p.layer, pool=p.pool, precision=spec.precision.name)
        sets[split] = cached_features(encoder, recipe.data, split, spec, key=key,
                                      root=p.cache_dir,
                                      progress=_stage(on_progress, f"features {split}"))
        check_labels(sets[split].labels, num_classes, "probe.num_classes", split)
    return _fit_and_score(recipe, sets, num_classes, run, on_progress)


def _fit_and_score(recipe: Recipe, sets: dict[str, FeatureSet], num_classes: int,
                   run: RunSetup, on_progress: StageProgress) -> dict[str, Any]:
    """Logistic regression for each weight decay of the grid, chosen on a held-out part of
    the train features, refitted on all of them, scored on the val features."""
    p, device = recipe.probe, dist.get_dist_info().device
    train, val = sets["train"], sets["val"]
    grid, fits = p.weight_decays, len(p.weight_decays) + 1  # the grid, then the refit
    log.info("fitting the logistic regression for %d weight decays, then once more on all "
             "of data.train (L-BFGS, %d x %d features, up to %d iterations each)", len(grid),
             *train.features.shape, p.max_iter)
    scores: list[float] = []
    for start in range(0, len(grid), run.info.world_size):  # one fit per rank at a time
        part = grid[start : start + run.info.world_size]
        try:
            scores += select_weight_decay(train.features, train.labels, num_classes, part,
                                          p.holdout_fraction, recipe.run.seed, p.max_iter,
                                          device, run.preempt)
        except FitStopped:
            raise _stopped(run, f"fit {start + 1} of {fits}") from None
        for j, (wd, score) in enumerate(zip(part, scores[start:], strict=True)):
            log.info("weight decay %g: held-out top-1 %.2f%% (fit %d of %d)", wd, score,
                     start + j + 1, fits)
        on_progress("fit", len(scores), fits)
    best = best_of_grid(grid, scores)
    log.info("weight decay %g chosen; refitting on all %d training images (fit %d of %d)",
             grid[best], len(train.labels), fits, fits)
    try:
        fit = fit_logreg(train.features, train.labels, num_classes, p.weight_decays[best],
                         p.max_iter, device, run.preempt)
    except FitStopped:
        raise _stopped(run, f"fit {fits} of {fits}") from None
    on_progress("fit", fits, fits)
    top1, top5 = fit.accuracy(val.features, val.labels)
    return {"top1": top1, "top5": top5, "weight_decay": p.weight_decays[best],
            "grid": [{"weight_decay": wd, "holdout_top1": _percent(s)}
                     for wd, s in zip(p.weight_decays, scores, strict=True)],
            "train_images": len(train.labels), "val_images": len(val.labels),
            "feature_dim": int(train.features.shape[1]),
            "features_from_cache": train.from_cache and val.from_cache}


def _stopped(run: RunSetup, where: str) -> CrateMAEError:
    """The error (exit 3, as a stopped training run) of a probe stopped by a signal during
    its fits: the same command fits again, on the features cached (or given)."""
    name = signal.Signals(run.preempt.signum or signal.SIGTERM).name
    return CrateMAEError(f"stopped by {name} during {where}; run the same command again to "
                         "fit from the first", exit_code=EXIT_REQUEUE)


class LinearProbeModel(nn.Module):
    """MAE's linear probe: frozen encoder -> pooled feature -> BatchNorm (no affine) -> head."""

    def __init__(self, encoder: CrateEncoder, num_classes: int, layer: int, pool: str) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.layer, self.pool = layer, pool
        d = encoder.embed_dim
        self.bn = nn.BatchNorm1d(d, affine=False, eps=1e-6)
        self.head = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> LinearProbeModel:
        super().train(mode)
        self.encoder.eval()  # frozen: always in inference mode
        return self

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        with torch.no_grad():
            tokens = self.encoder.layer_tokens(imgs, [self.layer], norm=True)[0]
            feats = tokens[:, 1:].mean(dim=1) if self.pool == "avg" else tokens[:, 0]  # (B, d)
        return self.head(self.bn(feats.float()))


class _MAEProbeTask(Task):
    """Cross-entropy of the probe head on augmented images; scored once, at the end."""

    def __init__(self, recipe: Recipe, model: LinearProbeModel, config: dict,
                 num_classes: int) -> None:
        self.recipe, self.model, self.config = recipe, model, config
        self.num_classes = num_classes
        self.info = dist.get_dist_info()
        self.img_size = model.encoder.config.img_size
        self.precision = resolve_precision(recipe.run.precision, self.info.device)
        self.data = build_data(recipe.data, **MAE_TRAIN_DATA,
                               img_size=self.img_size, seed=recipe.run.seed,
                               rank=self.info.rank, world_size=self.info.world_size,
                               decode_device=self.info.device)

    def loss(self, model: nn.Module, batch: Any, micro: int) -> torch.Tensor:
        check_labels(batch.labels, self.num_classes, "probe.num_classes")
        imgs = batch.model_input(self.info.device)
        labels = batch.labels.to(self.info.device, non_blocking=True)
        return nn.functional.cross_entropy(model(imgs), labels)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return classify(model, self.recipe.data, self.img_size, self.precision)


def _mae_protocol(recipe: Recipe, encoder: CrateEncoder, config: dict, num_classes: int,
                  run: RunSetup, on_log: Any) -> dict[str, Any]:
    model = LinearProbeModel(encoder, num_classes, recipe.probe.layer, recipe.probe.pool)
    task = _MAEProbeTask(recipe, model, config, num_classes)
    result = Trainer(run, task, on_log=on_log).fit()
    final = result.evals[-1]
    return {"top1": final["top1"], "top5": final["top5"], "steps": result.state.step,
            "val_images": final["images"], "last_checkpoint": str(result.last_checkpoint)}


def plan_probe(recipe: Recipe, checkpoint: str | Path | None, *,
               features: tuple[Path, Path] | None = None, run_dir: Path | None = None,
               overwrite: bool = False, recipe_name: str | None = None, world: int = 1,
               rank: int = 0, gpu_memory: float | None = None,
               images_per_second: float | None = None,
               rates: Rates | None = None) -> Plan:
    """What `probe` would do, need and cost, without an accelerator or a write
    (`cratemae probe --dry-run`): each step of its start-up, every failure a reason."""
    p, plan = recipe.probe, Plan("probe", world=world, rank=rank)
    source, encoder, num_classes = None, None, None
    named = Path(checkpoint) if checkpoint is not None else None
    with plan.check():
        if features is not None and p.protocol != "features":
            raise BadInputError('--features: the "mae" protocol trains on augmented images; '
                                'embeddings files serve probe.protocol = "features"')
        if features is not None:
            sets, meta = _embedded_sets(features, p.pool, p.layer)
            num_classes = _embedded_classes(meta, sets, p.num_classes)
            source = Source(str(meta.get("checkpoint") or meta.get("checkpoint_sha256")),
                            meta.get("checkpoint_sha256"))
            named = Path(str(meta.get("checkpoint") or features[0]))
            plan.add("Data", "features", [str(f) for f in features],
                     f"{len(sets['train'].labels):,} train and {len(sets['val'].labels):,} "
                     f"val features, {num_classes} classes: no image is decoded")
        else:
            assert checkpoint is not None
            source = Source(str(checkpoint), checkpoint_digest(checkpoint))
            loaded = load_encoder(checkpoint, recipe.model)
            recipe, notes = follow_checkpoint(recipe, loaded)
            encoder = loaded.model
            depth = encoder.config.depth
            plan.add("Model", "checkpoint", str(checkpoint),
                     "; ".join([source.describe(), *notes]))
            if not -depth <= p.layer < depth:
                raise BadInputError(f"probe.layer = {p.layer}, but the encoder of "
                                    f"{checkpoint} has {depth} layers (valid: "
                                    f"{-depth}..{depth - 1})")
            num_classes = (p.num_classes or unbuilt_demo_classes(recipe.data)
                           or resolve_num_classes(recipe, p.num_classes, "probe.num_classes"))
    if named is not None:
        with plan.check():
            where = run_dir_for(recipe, named, "probe", out=run_dir, recipe_name=recipe_name,
                                reads=tuple(features or ()))
            recipe = recipe.model_copy(update={"run": recipe.run.model_copy(
                update={"out_dir": str(where)})})
            plan_run_dir(plan, RunSetup(recipe, where, resume=Resume.AUTO, source=source,
                                        result=RunFiles(where).probe, overwrite=overwrite))
    if features is not None or encoder is None or num_classes is None:
        return plan
    img_size = encoder.config.img_size  # type: ignore[union-attr]
    if p.protocol == "features":  # inference over both splits, then a regression
        for split in ("train", "val"):
            plan_data(plan, recipe.data, split=split, augment="none", labels=True,
                      img_size=img_size, seed=0)
        plan_model(plan, encoder, _described(encoder, num_classes), encoder_only=True)
        plan.add("Schedule", "protocol", "features",
                 "features of both splits once (cached in probe.cache_dir), then logistic "
                 f"regression for {len(p.weight_decays)} weight decays and a refit: no "
                 "training steps")
        return plan
    model = LinearProbeModel(encoder, num_classes, p.layer, p.pool)  # type: ignore[arg-type]
    data = plan_data(plan, recipe.data, **MAE_TRAIN_DATA, img_size=img_size,
                     seed=recipe.run.seed)
    plan_data(plan, recipe.data, split="val", augment="none", labels=True, img_size=img_size,
              seed=0)
    plan_model(plan, model, _described(encoder, num_classes), encoder_only=True)
    plan.model_config = encoder.config  # type: ignore[union-attr]

    def forward(m: nn.Module, batch: int) -> torch.Tensor:  # as _MAEProbeTask.loss
        logits = m(torch.randn(batch, 3, img_size, img_size))
        return nn.functional.cross_entropy(logits, torch.randint(num_classes, (batch,)))

    estimate = estimate_memory(model, forward, recipe)
    plan.checkpoint_bytes = estimate.weights + estimate.optimizer
    plan_memory(plan, estimate, recipe.run.grad_checkpointing, gpu_memory)
    if data is not None:
        with plan.check():
            plan_schedule(plan, recipe, plan_steps(recipe, data.batches_per_epoch, world))
    plan_time(plan, images_per_second, rates=rates, model=recipe.model.name, img_size=img_size,
              data=recipe.data, task="probe")
    return plan


def _described(encoder: Any, num_classes: int) -> str:
    c = encoder.config
    return (f"{c.family} encoder, width {c.embed_dim}, depth {c.depth}, {c.img_size} px, "
            f"{num_classes} classes")
