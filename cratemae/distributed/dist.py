"""One code path for single-process, `torchrun` and `srun` launches.

`init_distributed()` reads the launcher's environment, picks the device (CUDA when present,
one GPU per process) and creates the process group only when there is more than one process.
The collective helpers below work with or without a process group, so training code never
branches on "am I distributed".

SLURM without torchrun: `srun --ntasks-per-node=G` starts one task per GPU and sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, but no rendezvous address. It comes from the
arguments (the recipe's `run.master_addr/master_port`), else MASTER_ADDR/MASTER_PORT, else the
first host of the job's node list and a port derived from the job id, which every task of the
job computes identically without talking to each other or calling `scontrol`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cratemae.distributed.device import choose_device
from cratemae.errors import BadInputError, CrateMAEError

__all__ = [
    "DistInfo",
    "LaunchEnv",
    "all_gather_tensors",
    "all_reduce_any",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "collective",
    "comm_device",
    "destroy_distributed",
    "first_host",
    "get_dist_info",
    "init_distributed",
    "is_main_process",
    "parse_launch_env",
    "raise_together",
]

DEFAULT_PORT = 29500
_INFO: DistInfo | None = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. `backend` is None when no process group was created."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process. `init_method` is None for a single process."""

    launcher: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    init_method: str | None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[001-004,007],gpu12` -> `node001`.

    Handles the compressed forms SLURM emits: `a,b`, `pre[1-3,7]`, zero padding, and a suffix
    after the bracket (`rack[1-2]-gpu`). Multi-bracket names use the first value of each range.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise BadInputError("SLURM node list is empty: cannot find the rendezvous host")
    # The first comma outside brackets ends the first host group.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    group = nodelist[:end]
    # Replace each bracket with its first value, keeping its zero padding (`[001-004]` -> 001).
    host = re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", group)
    if not host or any(c in host for c in "[],"):
        raise BadInputError(f"cannot parse SLURM node list {nodelist!r}")
    return host


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise BadInputError(f"environment variable {name}={env[name]!r} is not an integer") from exc


def _tcp(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6
    return f"tcp://{host}:{port}"


def parse_launch_env(
    env: Mapping[str, str], master_addr: str | None = None, master_port: int | None = None
) -> LaunchEnv:
    """Decide rank/world/local rank and the rendezvous from a launcher's environment.

    torchrun's variables win (it also sets MASTER_ADDR/PORT, read via `env://`). Under srun,
    SLURM_STEP_NUM_TASKS (the step's tasks) is preferred over SLURM_NTASKS (the job's).
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            addr = master_addr or env.get("MASTER_ADDR")
            port = master_port or int(env.get("MASTER_PORT", DEFAULT_PORT))
            if addr is None:
                raise BadInputError("RANK/WORLD_SIZE are set but MASTER_ADDR is not")
            return LaunchEnv("torchrun", rank, world, local, _tcp(addr, port))
        return LaunchEnv("torchrun", rank, world, local, "env://" if world > 1 else None)
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, key)
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world == 1:
            return LaunchEnv("slurm", rank, 1, local, None)
        addr = master_addr or env.get("MASTER_ADDR")
        if addr is None:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            nodes = nodes or env.get("SLURM_NODELIST", "")
            addr = first_host(nodes)
        port = master_port or (int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
        if port is None:
            job = _int_env(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else None
            port = DEFAULT_PORT if job is None else 20000 + job % 20000
        return LaunchEnv("slurm", rank, world, local, _tcp(addr, port))
    return LaunchEnv("single", 0, 1, 0, None)


def _pick_device(local_rank: int) -> torch.device:
    """This process's device (`choose_device`), made current when it is a GPU."""
    device = choose_device("auto", local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(
    master_addr: str | None = None, master_port: int | None = None, timeout_s: float = 1800.0
) -> DistInfo:
    """Set up this process from its launch environment and return where it sits.

    `master_addr`/`master_port` (the recipe's) are used for srun launches. With one process
    no process group is created. `timeout_s` bounds rendezvous and every collective, so a
    rank that never arrives makes the job fail instead of hanging.
    """
    global _INFO
    launch = parse_launch_env(os.environ, master_addr, master_port)
    device = _pick_device(launch.local_rank)
    backend = None
    if launch.init_method is not None:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                init_method=launch.init_method,
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timedelta(seconds=timeout_s),
                **({"device_id": device} if backend == "nccl" else {}),
            )
    _INFO = DistInfo(launch.rank, launch.world_size, launch.local_rank, device, backend)
    return _INFO


def get_dist_info() -> DistInfo:
    """The DistInfo of `init_distributed`, or a single-process CPU one if it was not called."""
    return _INFO or DistInfo(0, 1, 0, torch.device("cpu"), None)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    return get_dist_info().device if dist.get_backend() == "nccl" else torch.device("cpu")


def comm_device() -> torch.device:
    """Where tensors for collectives should live (CPU without a process group)."""
    return _comm_device() if _active() else torch.device("cpu")


def is_main_process() -> bool:
    """True on rank 0, and in a single process: the one way the package asks. Before the
    process group exists (a command setting up its console), the launcher's environment
    says which rank this process will be."""
    if _active():
        return dist.get_rank() == 0
    return parse_launch_env(os.environ).rank == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if _active():
        with collective("a barrier"):
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[_comm_device().index])
            else:
                dist.barrier()


@contextmanager
def collective(what: str) -> Iterator[None]:
    """A collective that fails because a peer died (gloo's "connection closed by peer",
    NCCL's watchdog) ends this rank with one line saying so, exit status 1, instead of a
    traceback; the dead rank's own log says why it died. Any other error (a bug, memory)
    passes through as it is."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError is one
        text = str(err)
        if not (_active() and (isinstance(err, getattr(dist, "DistBackendError", ()))
                               or any(w in text.lower() for w in _PEER_GONE))):
            raise
        reason = " ".join(text.split())[:160]
        raise CrateMAEError(f"rank {get_dist_info().rank}: {what} failed, another rank has "
                            f"stopped ({reason})") from err


# What the backends say when a peer is gone.
_PEER_GONE = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe")


def all_reduce_any(flag: bool) -> bool:
    """True on every rank if any rank's flag is True (e.g. "SIGTERM received: save and stop")."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    with collective("an all-reduce"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def raise_together(error: Exception | None, elsewhere: str) -> None:
    """Raise on every rank if any rank has an error: this rank's own, or a BadInputError
    saying `elsewhere` (one rank alone raising would leave the others in a collective)."""
    if all_reduce_any(error is not None):
        raise error or BadInputError(elsewhere)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks, as a new tensor on `t`'s device (input left unchanged)."""
    if not _active():
        return t.detach().clone()
    work = t.detach().to(_comm_device(), copy=True)
    if not work.is_floating_point():
        work = work.double()
    with collective("an all-reduce"):
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return (work / dist.get_world_size()).to(t.device)


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    if not _active():
        return t.detach().clone()
    work = t.detach().to(_comm_device(), copy=True)
    with collective("an all-reduce"):
        dist.all_reduce(work, op=op)
    return work.to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of `t` over ranks, as a new tensor on `t`'s device."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over ranks, as a new tensor on `t`'s device."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t`, in rank order, on `t`'s device. Shapes may differ between ranks
    (same dtype and number of dimensions): sizes are exchanged first and data padded."""
    if not _active():
        return [t.detach().clone()]
    device, world = _comm_device(), dist.get_world_size()
    shape = torch.tensor(list(t.shape), dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    with collective("an all-gather"):
        dist.all_gather(shapes, shape)
    numels = [int(torch.prod(s).item()) if s.numel() else 1 for s in shapes]
    padded = torch.zeros(max(numels), dtype=t.dtype, device=device)
    padded[: t.numel()] = t.detach().reshape(-1).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    with collective("an all-gather"):
        dist.all_gather(gathered, padded)
    return [
        g[:n].reshape([int(d) for d in s.tolist()]).to(t.device)
        for g, n, s in zip(gathered, numels, shapes, strict=True)
    ]


def destroy_distributed() -> None:
    """Tear down the process group (if any) so the process can exit cleanly."""
    global _INFO
    if _active():
        dist.destroy_process_group()
    _INFO = None
