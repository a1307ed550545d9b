"""The README's demo table: CRATE-MAE (the paper's model), its visible-only variant and MAE's
ViT, each pre-trained, probed and fine-tuned on the built-in demo data by the commands.

    python benchmarks/demo_table.py --out runs/demo-table            # every row
    python benchmarks/demo_table.py --out runs/demo-table --rows 0 1 2  # the recipes as shipped

About 5 minutes a row on 2 CPU cores. Rows 3-5 are the three models at mask ratio 0.75
(MAE's and the paper's ImageNet setting) instead of the demo's 0.5.

For each model: `cratemae pretrain` of its recipe, `cratemae probe recipes/probe/demo.toml`
of the result and of the model at its initialisation (a one-step run: the learning rate of
step 0 of the warm-up is 0, so its weights are the initial ones), and `cratemae finetune
recipes/finetune/demo.toml`. Pre-training images/s is the run's images (steps x batch)
over its elapsed time, from the last line of its metrics.jsonl. Prints a Markdown table;
the runs stay under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # row -> (recipe, --set values)
    "CRATE-MAE, the paper's model": ("recipes/demo.toml", []),
    "CRATE-MAE, visible-only encoder (MAE's variant)": (
        "recipes/demo.toml", ["model.encoder_visible_only=true"]),
    "MAE's ViT": ("recipes/demo-mae.toml", []),
    "CRATE-MAE, the paper's model, mask 0.75": ("recipes/demo.toml", ["model.mask_ratio=0.75"]),
    "CRATE-MAE, visible-only encoder, mask 0.75": (
        "recipes/demo.toml", ["model.encoder_visible_only=true", "model.mask_ratio=0.75"]),
    "MAE's ViT, mask 0.75": ("recipes/demo-mae.toml", ["model.mask_ratio=0.75"]),
}


def cratemae(*args: str) -> dict:
    """Run one command with --json and return its result."""
    cmd = [sys.executable, "-m", "cratemae", *args, "--json"]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def measure(recipe: str, extra: list[str], out: Path, limit: list[str]) -> dict:
    run, init = out / "pretrain", out / "init"
    cratemae("pretrain", recipe, "--out", str(run), *sets([*extra, *limit]))
    cratemae("pretrain", recipe, "--out", str(init), *sets([*extra, "schedule.max_steps=1"]))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    batch = int(cratemae_recipe_value(recipe, extra, "data.batch_size"))
    probe = cratemae("probe", "recipes/probe/demo.toml", "--checkpoint", str(run),
                     "--out", str(out / "probe"))
    probe_init = cratemae("probe", "recipes/probe/demo.toml", "--checkpoint", str(init),
                          "--out", str(out / "probe-init"))
    tune = cratemae("finetune", "recipes/finetune/demo.toml", "--checkpoint", str(run),
                    "--out", str(out / "finetune"), "--resume", "never", *sets(limit))
    return {
        "params": parameter_count(run),
        "images_per_s": last["step"] * batch / last["elapsed_s"],
        "probe": probe["top1"], "probe_init": probe_init["top1"],
        "finetune": tune["final"]["top1"],
    }


def cratemae_recipe_value(recipe: str, extra: list[str], key: str) -> object:
    sys.path.insert(0, str(REPO))
    from cratemae.recipe import load_recipe

    node: object = load_recipe(REPO / recipe, extra)
    for part in key.split("."):
        node = getattr(node, part)
    return node


def parameter_count(run: Path) -> int:
    sys.path.insert(0, str(REPO))
    from cratemae.weights.load import load_model

    model = load_model(run).model
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo-table"))
    parser.add_argument("--max-steps", type=int, help="stop each run early (a smoke test)")
    parser.add_argument("--rows", type=int, nargs="*", help="only these rows (0-based)")
    args = parser.parse_args()
    rows = {}
    for i, (name, (recipe, extra)) in enumerate(MODELS.items()):
        if args.rows is not None and i not in args.rows:
            continue
        limit = [f"schedule.max_steps={args.max_steps}"] if args.max_steps else []
        rows[name] = measure(recipe, extra, args.out.resolve() / f"model-{i}", limit)
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    print("| model | parameters | pre-training img/s | probe top-1 (at init) | fine-tune top-1 |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['images_per_s']:.0f} | "
              f"{r['probe']:.1f}% ({r['probe_init']:.1f}%) | {r['finetune']:.1f}% |")


if __name__ == "__main__":
    main()
