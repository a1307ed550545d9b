"""Peak memory of one pre-training step with and without gradient checkpointing (CPU).

    .venv/bin/python benchmarks/grad_checkpointing.py [--model crate_mae_tiny] [--img-size 224]
                                                      [--batch 8] [--threads 2]

Each mode runs in a fresh Python process (a process's peak resident set size only grows):
build the model and AdamW, then one step (forward with the masked-patch loss, backward,
optimizer step) on random images. Printed per mode: the peak RSS of the process, the RSS
just before the step, their difference (what the step itself needed: activations kept for
the backward pass, gradients, AdamW's state), the bytes autograd holds for the backward pass
at the end of the forward (tensors saved for backward, each storage counted once; measured
on a second forward) and the step's time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

MIB = 2**20


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one_step(model_name: str, img_size: int, batch: int, checkpointing: bool) -> dict:
    import torch

    from cratemae.model import create_model

    torch.manual_seed(0)
    model = create_model(model_name, img_size=img_size)
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(batch, 3, img_size, img_size)
    noise = torch.rand(batch, model.config.num_patches)
    gc.collect()
    before = _rss_now()
    start = time.perf_counter()
    loss = model(imgs, noise=noise).loss
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    return dict(checkpointing=checkpointing, loss=float(loss), peak_mib=peak / MIB,
                before_mib=before / MIB, step_mib=(peak - before) / MIB, seconds=seconds,
                saved_mib=_saved_for_backward(model, imgs, noise) / MIB)


def _saved_for_backward(model, imgs, noise) -> int:
    """Bytes of the distinct storages autograd keeps from the forward for the backward."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(imgs, noise=noise).loss
    del loss
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crate_mae_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # the child: one measurement, as JSON
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one_step(args.model, args.img_size, args.batch, args.mode == "on")))
        return
    rows = []
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--model", args.model, "--img-size",
               str(args.img_size), "--batch", str(args.batch), "--threads", str(args.threads),
               "--mode", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, one pre-training step, "
          f"CPU, {args.threads} threads")
    print(f"{'checkpointing':<14}{'peak RSS':>11}{'before step':>13}{'step needs':>12}"
          f"{'saved for backward':>20}{'time':>8}{'loss':>10}")
    for r in rows:
        print(f"{'on' if r['checkpointing'] else 'off':<14}{r['peak_mib']:>7.0f} MiB"
              f"{r['before_mib']:>9.0f} MiB{r['step_mib']:>8.0f} MiB{r['saved_mib']:>16.0f} MiB"
              f"{r['seconds']:>7.1f}s"
              f"{r['loss']:>10.5f}")
    off, on = rows
    print(f"the step needs {on['step_mib'] / off['step_mib']:.0%} of the memory with "
          f"checkpointing ({off['step_mib'] - on['step_mib']:.0f} MiB less); same loss: "
          f"{on['loss'] == off['loss']}")


if __name__ == "__main__":
    main()
