"""`cratemae embed` on two ranks (srun-style launch, gloo): each rank embeds its share into
its own chunks, rank 0 writes the one file, in data-set order, each sample once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import REPO

from cratemae.checkpoints import write_model_weights
from cratemae.eval.embed import parts_dir
from cratemae.eval.embeddings import read_embeddings
from cratemae.model import CrateMAEConfig, build_model


def _launch(args: list[str], ranks: int) -> list[subprocess.Popen[str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = 20000 + s.getsockname()[1] % 20000
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env = {**clean, "OMP_NUM_THREADS": "1", "SLURM_NTASKS": str(ranks),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)}
    cmd = [sys.executable, "-m", "cratemae", "embed", *args]
    return [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**env, "SLURM_PROCID": str(r),
                                             "SLURM_LOCALID": str(r)})
            for r in range(ranks)]


@pytest.mark.slow  # three processes that import torch: about 15 s on two busy cores
def test_two_ranks_write_one_file_in_data_set_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    c = CrateMAEConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    ckpt = write_model_weights(tmp_path / "m.safetensors", build_model(c).state_dict(),
                               c.to_dict())
    rng = np.random.default_rng(0)
    for i in range(13):  # odd: rank 1 repeats its last sample, which is written once
        d = tmp_path / "images" / ("a" if i < 6 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / f"{i}.png")
    outs = {}
    for ranks in (1, 2):
        out = tmp_path / f"{ranks}.safetensors"
        procs = _launch([str(tmp_path / "images"), "--checkpoint", str(ckpt), "--out", str(out),
                         "--workers", "1", "--batch-size", "2", "--chunk-size", "3"], ranks)
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * ranks, errs
        assert not parts_dir(out).exists()
        outs[ranks] = read_embeddings(out)
    (f1, y1, k1, m1), (f2, y2, k2, m2) = outs[1], outs[2]
    assert k1 == k2 and len(k2) == 13 and k2 == sorted(k2)
    assert torch.equal(y1, y2) and y2.tolist() == [0] * 6 + [1] * 7
    torch.testing.assert_close(f1, f2, atol=1e-6, rtol=0)
    assert m1["checkpoint_sha256"] == m2["checkpoint_sha256"]
