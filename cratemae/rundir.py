"""The run directory: the one place that names every file and folder a run holds.

    RUN_DIR/
      recipe.toml        the resolved recipe (defaults, the recipe file, --set overrides)
      log.txt            the console's lines
      metrics.jsonl      one JSON object per logged step, evaluation or recovery
      status.json        running (host, pid) / finished / stopped / failed
      checkpoints/       step-000000123/{model.safetensors, train_state.safetensors, meta.json}
      best/              the best evaluated weights (fine-tuning): model.safetensors, best.json
      samples/           reconstruction pictures of pre-training's validation
      tensorboard/       TensorBoard event files
      probe.json         a probe's result
      finetune.json      a fine-tuning run's result
      layers.json        `cratemae analyze`'s measures

An export folder holds `model.safetensors` (and timm's `config.json`) the same way. Like
`cratemae.fs`, this module imports nothing of cratemae: every package may use it, and no
other module spells these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BEST_DIR",
    "BEST_RECORD_FILE",
    "CKPT_DIR",
    "FINETUNE_FILE",
    "LAYERS_FILE",
    "LOG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "PROBE_FILE",
    "RECIPE_FILE",
    "RUNS_DIR",
    "SAMPLES_DIR",
    "STATUS_FILE",
    "TENSORBOARD_DIR",
    "RunFiles",
]

# Where commands look for runs when no checkpoint is named (relative to the working folder).
RUNS_DIR = Path("runs")

RECIPE_FILE = "recipe.toml"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
CKPT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_RECORD_FILE = "best.json"  # in best/: the step and scores of the weights there
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
PROBE_FILE = "probe.json"
FINETUNE_FILE = "finetune.json"
LAYERS_FILE = "layers.json"
# The weights of a checkpoint, of the best model and of an export.
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run directory: `RunFiles(run_dir).metrics` is its metrics.jsonl."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CKPT_DIR

    @property
    def best(self) -> Path:
        return self.root / BEST_DIR

    @property
    def best_model(self) -> Path:
        return self.root / BEST_DIR / MODEL_FILE

    @property
    def best_record(self) -> Path:
        return self.root / BEST_DIR / BEST_RECORD_FILE

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_DIR

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def probe(self) -> Path:
        return self.root / PROBE_FILE

    @property
    def finetune(self) -> Path:
        return self.root / FINETUNE_FILE

    @property
    def layers(self) -> Path:
        return self.root / LAYERS_FILE

    @property
    def model(self) -> Path:
        """An export folder's (or `best/`'s) weights."""
        return self.root / MODEL_FILE

    def is_run(self) -> bool:
        """A run directory is one that holds its resolved recipe."""
        return self.recipe.is_file()
