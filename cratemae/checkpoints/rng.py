"""This process's random-number-generator states, as tensors, so a resumed run draws the same
masks, crops and dropout as the run that was interrupted.

Four generators matter: torch's CPU generator, every visible CUDA device's generator, numpy's
global `np.random` state (data augmentation libraries use it) and python's `random`. All are
encoded bit-exactly as integer/float64 tensors so they fit into a safetensors file and can be
gathered across ranks (`pack_rng_state` turns one rank's dict into a single uint8 tensor of
the same length on every rank with the same devices).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["collect_rng_state", "pack_rng_state", "restore_rng_state", "unpack_rng_state"]


def collect_rng_state() -> dict[str, torch.Tensor]:
    """Snapshot torch CPU, CUDA (all devices, if available), numpy and python RNG states."""
    state: dict[str, torch.Tensor] = {"torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack([s.cpu() for s in torch.cuda.get_rng_state_all()])
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if name != "MT19937":  # np.random's global state is always MT19937; guard the encoding.
        raise RuntimeError(f"unexpected numpy bit generator {name!r}")
    state["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    state["numpy_pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    state["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    state["python_state"] = torch.tensor(list(internal), dtype=torch.int64)
    state["python_version"] = torch.tensor([version], dtype=torch.int64)
    # gauss_next is None or a float; keep the "is set" flag separately so None round-trips.
    has_next = gauss_next is not None
    state["python_gauss"] = torch.tensor(
        [1.0 if has_next else 0.0, gauss_next if has_next else 0.0], dtype=torch.float64
    )
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Put back the states `collect_rng_state` returned (possibly after a save/load round trip).

    CUDA states are restored for as many devices as both the snapshot and this process have;
    a snapshot taken without CUDA leaves the CUDA generators alone.
    """
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = [s.to(torch.uint8).cpu() for s in state["cuda"]]
        for device, s in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"].item())))
    has_next, gauss_next = state["python_gauss"].tolist()
    random.setstate(
        (
            int(state["python_version"].item()),
            tuple(int(v) for v in state["python_state"].tolist()),
            gauss_next if has_next else None,
        )
    )


def pack_rng_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """One rank's RNG dict as a single uint8 tensor, for `all_gather_tensors`."""
    return torch.frombuffer(bytearray(st_save(state)), dtype=torch.uint8)


def unpack_rng_state(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of `pack_rng_state`."""
    return st_load(packed.cpu().to(torch.uint8).numpy().tobytes())
