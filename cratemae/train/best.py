"""Evaluations during training, and the best weights so far kept in `RUN_DIR/best/`.

`best/model.safetensors` is a weights file (`cratemae probe --checkpoint RUN_DIR/best/...`
reads it) and `best/best.json` says which evaluation it won; the usual checkpoints are the
last ones. On resume, a best recorded after the checkpoint resumed from is forgotten (that
part of the run is repeated), so the kept best is always one the resumed run has seen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from cratemae.checkpoints import write_model_weights
from cratemae.distributed import dist
from cratemae.fs import atomic_write_json
from cratemae.rundir import RunFiles

__all__ = ["BestKeeper"]

log = logging.getLogger("cratemae")


class BestKeeper:
    """Compare each evaluation's top-1 with the best so far; save the winner's weights."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        self.files, self.config = RunFiles(run_dir), config
        self.record: dict[str, Any] | None = None
        file = self.files.best_record
        if resume_step is not None and file.is_file():
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict) and record.get("step", resume_step + 1) <= resume_step:
                self.record = record

    def offer(self, record: dict[str, Any], candidates: dict[str, nn.Module]) -> bool:
        """`candidates` maps a metric prefix ("" for the model, "ema_" for its average) to the
        module scored under it in `record`. True if one beat the best so far (strictly)."""
        prefix = max(candidates, key=lambda p: record[f"{p}top1"])
        top1 = record[f"{prefix}top1"]
        if self.record is not None and top1 <= self.record["top1"]:
            return False
        self.record = {"step": record["step"], "epoch": record["epoch"], "top1": top1,
                       "top5": record[f"{prefix}top5"], "weights": prefix.rstrip("_") or "model",
                       "path": str(self.files.best_model)}
        if dist.is_main_process():
            state = {k: v.detach().cpu() for k, v in candidates[prefix].state_dict().items()}
            write_model_weights(self.files.best_model, state, self.config)
            atomic_write_json(self.files.best_record, self.record, indent=1)
            log.info("new best top-1 %.2f%% at step %d (%s weights) saved in %s", top1,
                     record["step"], self.record["weights"], self.files.best)
        return True
