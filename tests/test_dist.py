"""Launch-environment parsing (torchrun, srun) and real two-process gloo collectives."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from support import REPO

from cratemae.distributed import dist
from cratemae.distributed.dist import (
    DistInfo,
    LaunchEnv,
    all_gather_tensors,
    all_reduce_any,
    all_reduce_mean,
    barrier,
    destroy_distributed,
    first_host,
    get_dist_info,
    init_distributed,
    is_main_process,
    parse_launch_env,
)
from cratemae.errors import BadInputError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node[001-004,007],gpu12", "node001"),
        ("gpu12,node[1-2]", "gpu12"),
        ("a-b-01", "a-b-01"),
        ("node[7]", "node7"),
        ("node[010,002-003]", "node010"),
        ("rack[3-4]-gpu[01-02],x", "rack3-gpu01"),
        ("x[1-2],y[3-4]", "x1"),
        (" 10.1.2.3 ", "10.1.2.3"),
    ],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node[1-", "node]1["])
def test_first_host_rejects_garbage(nodelist: str) -> None:
    with pytest.raises(BadInputError, match="node list"):
        first_host(nodelist)


def test_parse_torchrun_env() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "9",
    }
    assert parse_launch_env(env) == LaunchEnv("torchrun", 3, 8, 1, "env://")
    # torchrun's own rendezvous wins over the recipe's address.
    assert parse_launch_env(env, "other", 1).init_method == "env://"
    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert parse_launch_env(single) == LaunchEnv("torchrun", 0, 1, 0, None)
    partial = {"RANK": "1", "WORLD_SIZE": "2"}
    assert parse_launch_env(partial, "10.0.0.5", 4242).init_method == "tcp://10.0.0.5:4242"
    with pytest.raises(BadInputError, match="MASTER_ADDR is not"):
        parse_launch_env(partial)
    with pytest.raises(BadInputError, match="RANK='x' is not an integer"):
        parse_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_parse_slurm_env() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "node[003-004]",
    }
    assert parse_launch_env(env) == LaunchEnv("slurm", 5, 8, 1, "tcp://node003:23456")
    assert parse_launch_env(env, "10.0.0.1", 1234).init_method == "tcp://10.0.0.1:1234"
    assert parse_launch_env(env, "fe80::1").init_method == "tcp://[fe80::1]:23456"
    with_master = {**env, "MASTER_ADDR": "m", "MASTER_PORT": "777"}
    assert parse_launch_env(with_master).init_method == "tcp://m:777"
    # srun inside a bigger allocation: the step's task count is the world.
    step = {**env, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[9-10]"}
    assert parse_launch_env(step) == LaunchEnv("slurm", 5, 4, 1, "tcp://gpu9:23456")
    one = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert parse_launch_env(one) == LaunchEnv("slurm", 0, 1, 0, None)
    assert parse_launch_env({"SLURM_JOB_ID": "1"}) == LaunchEnv("single", 0, 1, 0, None)


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*LAUNCH_VARS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    try:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        assert info == DistInfo(0, 1, 0, device, None) and dist.is_main_process()
        assert get_dist_info() is info
        assert not torch.distributed.is_initialized()
        assert all_reduce_any(True) and not all_reduce_any(False)
        t = torch.tensor([1.0, 3.0])
        mean = all_reduce_mean(t)
        assert torch.equal(mean, t) and mean is not t
        assert [g.tolist() for g in all_gather_tensors(t)] == [[1.0, 3.0]]
        assert is_main_process()
        barrier()
    finally:
        destroy_distributed()


_WORKER = r"""
import json, sys, torch
from cratemae.checkpoints import collect_rng_state, pack_rng_state, unpack_rng_state
from cratemae.checkpoints import restore_rng_state
from cratemae.distributed import dist as d

info = d.init_distributed(master_addr=sys.argv[1] or None, timeout_s=30)
r = info.rank
torch.manual_seed(100 + r)
packed = pack_rng_state(collect_rng_state())
draw = torch.rand(3)
states = d.all_gather_tensors(packed)
draws = d.all_gather_tensors(draw)
restore_rng_state(unpack_rng_state(states[1 - r]))  # the other rank's generator
out = {
    "rank": r, "world": info.world_size, "local": info.local_rank, "backend": info.backend,
    "main": d.is_main_process(),
    "any_one": d.all_reduce_any(r == 1), "any_none": d.all_reduce_any(False),
    "mean": d.all_reduce_mean(torch.tensor([2.0 * r, 10.0])).tolist(),
    "mean_int": d.all_reduce_mean(torch.tensor([r])).tolist(),
    "shapes": [list(g.shape) for g in d.all_gather_tensors(torch.full((r + 1, 2), r))],
    "values": [g.sum().item() for g in d.all_gather_tensors(torch.full((r + 1, 2), r))],
    "scalars": [g.item() for g in d.all_gather_tensors(torch.tensor(r * 1.5))],
    "other_draw_reproduced": torch.equal(torch.rand(3), draws[1 - r]),
}
d.barrier()
d.destroy_distributed()
print("RESULT " + json.dumps(out), flush=True)
"""


def _free_port(low: int = 20000, high: int = 40000) -> int:
    """A port that is free now, in [low, high) so a SLURM job id can map to it."""
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _launch_env(launcher: str, rank: int, port: int) -> tuple[dict[str, str], str]:
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM")
    }
    env.update({"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    if launcher == "torchrun":
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return env, ""
    # srun, one task per GPU: no MASTER_*; the port derives from the job id, the address
    # comes from the recipe argument (the node list names a host that does not resolve here).
    env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank))
    env.update(SLURM_JOB_ID=str(port - 20000 + 20000 * 7), SLURM_JOB_NODELIST="node[001-002]")
    return env, "127.0.0.1"


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_process_gloo_collectives(launcher: str) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env, addr = _launch_env(launcher, rank, port)
        cmd = [sys.executable, "-c", _WORKER, addr]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
        assert p.returncode == 0, err.decode()[-2000:]
        line = [x for x in out.decode().splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world"] == 2 and res["local"] == rank
        assert res["backend"] == "gloo" and res["main"] == (rank == 0)
        assert res["any_one"] is True and res["any_none"] is False
        assert res["mean"] == [1.0, 10.0] and res["mean_int"] == [0.5]
        assert res["shapes"] == [[1, 2], [2, 2]] and res["values"] == [0.0, 4.0]
        assert res["scalars"] == [0.0, 1.5]
        assert res["other_draw_reproduced"] is True


# --- errors and collectives: one verdict, agreed by every rank ------------------------------


def test_raise_together_raises_this_ranks_error_or_none() -> None:
    dist.raise_together(None, "elsewhere")  # nothing wrong anywhere: no error
    with pytest.raises(BadInputError, match=r"^mine$"):
        dist.raise_together(BadInputError("mine"), "elsewhere")


def test_an_error_that_is_not_a_lost_peer_passes_through_the_collective_guard() -> None:
    with pytest.raises(RuntimeError, match=r"^shapes do not match$"), dist.collective("a step"):
        raise RuntimeError("shapes do not match")  # a bug stays a bug, with its traceback
