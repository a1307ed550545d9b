"""Images per second of `cratemae embed` and of the probe's own feature pass
(`cratemae.eval.features.extract_features`) on the same data, the same model, batch size and
workers, run in turn (A, B, A, B, ...) in one process; the best of the repeats of each.

The model is the demo recipe's (recipes/demo.toml, untrained: speed does not depend on the
weights), the data the built-in demo set (built on first use). Both read, decode, resize,
encode; embed also writes its chunks and the final file, which the timing includes.

    .venv/bin/python benchmarks/embed_speed.py [--split train|val] [--workers N]
        [--batch-size B] [--repeats R] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cratemae.checkpoints import write_model_weights
from cratemae.distributed.device import choose_device
from cratemae.distributed.precision import resolve_precision
from cratemae.eval.embed import EmbedSettings, embed
from cratemae.eval.embed_data import data_source
from cratemae.eval.features import FeatureSpec, extract_features
from cratemae.model import CrateMAEConfig, build_model
from cratemae.recipe import load_recipe
from cratemae.weights.load import checkpoint_digest, load_encoder

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="train", choices=("train", "val"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = choose_device(args.device)
    recipe = load_recipe(DEMO, [f"data.num_workers={args.workers}",
                                f"data.batch_size={args.batch_size}"])
    config = CrateMAEConfig(**recipe.model.config_overrides())
    tmp = Path(tempfile.mkdtemp(prefix="embed-speed-"))
    torch.manual_seed(0)
    ckpt = write_model_weights(tmp / "demo.safetensors", build_model(config).state_dict(),
                               config.to_dict())
    loaded = load_encoder(ckpt, device=device)
    encoder = loaded.encoder
    precision = resolve_precision(recipe.run.precision, device)
    data = recipe.data.model_copy(update={"mean": loaded.mean, "std": loaded.std})
    spec = FeatureSpec(-1, "token", config.img_size, precision)
    source = data_source([getattr(recipe.data, args.split)], args.split)
    settings = EmbedSettings(batch_size=args.batch_size, num_workers=args.workers,
                             precision=precision.name)
    identity = {"architecture": "demo", "checkpoint_sha256": checkpoint_digest(ckpt),
                "model": config.to_dict()}

    def probe_pass() -> int:
        return int(extract_features(encoder, data, args.split, spec).labels.numel())

    def embed_pass() -> int:
        out = tmp / "features.safetensors"
        return embed(encoder, source, out, settings, mean=loaded.mean, std=loaded.std,
                     identity=identity, device=device, overwrite=True).num_samples

    best: dict[str, float] = {"probe feature pass": 0.0, "cratemae embed": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("probe feature pass", probe_pass), ("cratemae embed", embed_pass)):
            start = time.perf_counter()
            n = fn()
            best[name] = max(best[name], n / (time.perf_counter() - start))
    print(f"demo:{args.split}, {n} images at {config.img_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, {device}, {precision.name}, torch threads "
          f"{torch.get_num_threads()}; best of {args.repeats}:")
    for name, rate in best.items():
        print(f"  {name:<20} {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
