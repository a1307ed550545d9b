"""Choosing the device a process computes on: one rule for every command and launch."""

from __future__ import annotations

import torch

from cratemae.errors import BadInputError

__all__ = ["choose_device"]


def choose_device(name: str | None = "auto", *, flag: str = "--device",
                  local_rank: int = 0) -> torch.device:
    """The device `name` asks for, refused in one line when it is not here.

    "auto" (or None): this process's GPU when CUDA is available, else the CPU. The GPU is
    cuda:`local_rank` when the process sees every GPU of its node, cuda:0 when the launcher
    gave each task its own (`srun --gpus-per-task=1` leaves one visible device).
    "cpu", "cuda" and "cuda:N" name a device; `flag` names the option in errors.
    """
    name = "auto" if name is None else str(name)
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if count > 1 and local_rank >= count:
            raise BadInputError(f"local rank {local_rank} but only {count} GPUs are visible")
        return torch.device("cuda", local_rank if count > 1 else 0)
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:")
                                                 and name[5:].isdigit()):
        raise BadInputError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"{flag} {name}: no CUDA GPU is available here; use {flag} cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise BadInputError(f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    return torch.device("cpu")
