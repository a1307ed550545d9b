"""`cratemae analyze` and the white-box diagnostics behind it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import cli

from cratemae.analysis import (
    PatchPCA,
    analyze,
    coding_rate,
    record_layers,
    sparsity,
)
from cratemae.model import CrateMAE, CrateMAEConfig
from cratemae.weights.load import LoadedModel

PNG = b"\x89PNG\r\n\x1a\n"


def reference_rate(u: torch.Tensor, eps2: float, normalize: bool = True) -> torch.Tensor:
    """1/2 sum_k logdet(I_N + p/(N eps^2) u_k u_k^T), straight from the definition."""
    u = u.double()
    if normalize:
        u = u / u.norm(dim=-1, keepdim=True)
    _, _, N, p = u.shape
    m = torch.eye(N, dtype=torch.float64) + p / (N * eps2) * u @ u.transpose(-2, -1)
    sign, logabs = torch.linalg.slogdet(m)
    assert bool((sign > 0).all())
    return 0.5 * logabs.sum(-1)


@pytest.mark.parametrize(("tokens", "dim"), [(5, 8), (9, 4), (6, 6), (17, 3)])
@pytest.mark.parametrize("eps2", [0.01, 0.5])
def test_coding_rate_matches_slogdet(tokens: int, dim: int, eps2: float) -> None:
    gen = torch.Generator().manual_seed(tokens * 100 + dim)
    u = torch.randn(3, 2, tokens, dim, generator=gen)
    got, want = coding_rate(u, eps2), reference_rate(u, eps2)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-10), (got - want).abs().max()
    raw = coding_rate(u, eps2, normalize=False)
    assert torch.allclose(raw, reference_rate(u, eps2, normalize=False), rtol=1e-12, atol=1e-10)


def test_coding_rate_sees_directions_not_scale_and_falls_when_tokens_align() -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 10, 4, generator=gen)
    assert torch.allclose(coding_rate(u), coding_rate(u * 7.5), rtol=1e-6)  # float32 input
    aligned = u[:, :, :1].expand_as(u)  # every token in one direction: rank 1 per head
    assert bool((coding_rate(aligned) < coding_rate(u)).all())


def test_sparsity_is_the_fraction_of_nonzero_entries() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.relu(torch.randn(4, 7, 5, generator=gen))
    want = [np.count_nonzero(z[b].numpy()) / z[b].numel() for b in range(4)]
    assert sparsity(z).tolist() == pytest.approx(want, abs=1e-15)
    assert sparsity(torch.zeros(1, 3, 2)).item() == 0.0


def small_encoder(depth: int = 3) -> LoadedModel:
    torch.manual_seed(0)
    config = CrateMAEConfig(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        num_heads=4,
        depth=depth,
        decoder_embed_dim=32,
        decoder_num_heads=4,
        decoder_depth=1,
    )
    encoder = CrateMAE(config).encoder.eval()
    return LoadedModel(encoder, Path("random"), (0.5,) * 3, (0.25,) * 3, True)


def test_record_layers_measures_each_layer_output_against_its_own_subspaces() -> None:
    encoder = small_encoder().encoder
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    record = record_layers(encoder, imgs, attention_layers=(1, 2), feature_layer=1)  # from 0
    with torch.no_grad():  # the same, by hand: run the layers one by one
        tokens, cls, _ = encoder.embed(imgs)
        z = torch.cat([cls.expand(3, -1, -1), tokens], dim=1)
        blocks = list(encoder.blocks)
        rates = [coding_rate(blocks[0].mssa.project(blocks[0].norm1(z)))]
        sparse, inputs = [sparsity(z)], []
        for block in blocks:
            inputs.append(coding_rate(block.mssa.project(block.norm1(z))))
            if block is blocks[1]:
                features = block.mssa.u_proj(block.norm1(z))[:, 1:]
            z = block(z)
            rates.append(coding_rate(block.mssa.project(block.norm1(z))))
            sparse.append(sparsity(z))
    assert torch.allclose(record.coding_rate, torch.stack(rates, 1), rtol=1e-6)
    assert torch.allclose(record.coding_rate_input, torch.stack(inputs, 1), rtol=1e-6)
    assert torch.equal(record.sparsity, torch.stack(sparse, 1))
    assert record.features is not None and torch.allclose(record.features, features, atol=1e-6)
    assert sorted(record.cls_attention) == [1, 2]
    att = record.cls_attention[2]  # (B, K, L): the CLS row without the CLS column
    assert att.shape == (3, 4, 16) and bool((att > 0).all()) and bool((att.sum(-1) < 1).all())


def test_numbers_do_not_depend_on_batch_size() -> None:
    model = small_encoder()
    imgs = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names = ["a", "b", "c", "d", "e"]
    runs = [
        analyze(model, imgs.split(size), names=names, pca_layer=2, device=torch.device("cpu"))
        for size in (7, 3, 1)
    ]
    for other in runs[1:]:
        assert other.num_images == 7
        for a, b in zip(runs[0].layers, other.layers, strict=True):
            for key in ("coding_rate", "sparsity"):
                # float32 forwards of other batch sizes differ in the last bits (threads
                # split a matrix product by its rows): the aggregation must add nothing.
                assert a[key]["mean"] == pytest.approx(b[key]["mean"], rel=1e-6, abs=1e-9)
                assert a[key]["std"] == pytest.approx(b[key]["std"], rel=1e-6, abs=1e-9)
        for p, q in zip(runs[0].pictures, other.pictures, strict=True):
            assert p.name == q.name
            np.testing.assert_allclose(p.pca_rgb, q.pca_rgb, atol=1e-4)
            np.testing.assert_allclose(p.attention[2], q.attention[2], atol=1e-6)
    assert [p.name for p in runs[0].pictures] == names


def test_patch_pca_streamed_equals_pca_of_all_features() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    pca = PatchPCA()
    for chunk in x.split(13):
        pca.add(chunk)
    mean, comps = pca.fit(3)
    centred = (x - x.mean(0)).double()
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    assert torch.allclose(mean, x.mean(0).double(), atol=1e-6)
    cosines = (comps * vh[:3].T).sum(0).abs()  # the same directions, signs aside
    assert torch.allclose(cosines, torch.ones(3, dtype=torch.float64), atol=1e-6)


# --- the command ------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    result = cli("analyze", *args)
    try:
        err = result.stderr
    except ValueError:  # older CliRunners mix the streams
        err = result.stdout
    return result.exit_code, err


def check_layers_json(path: Path, num_images: int, depth: int) -> dict:
    summary = json.loads(path.read_text())
    assert summary["num_images"] == num_images and summary["eps2"] == 0.01
    assert [e["depth"] for e in summary["layers"]] == list(range(depth + 1))
    for entry in summary["layers"]:
        rate, sparse = entry["coding_rate"], entry["sparsity"]
        assert rate["mean"] > 0 and rate["std"] >= 0
        assert 0 <= sparse["mean"] <= 1 and sparse["std"] >= 0
    return summary


def test_analyze_two_photos_writes_all_outputs(
    demo_checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    code, err = run_cli(
        "--checkpoint",
        str(demo_checkpoint),
        *map(str, photos),
        "--out",
        str(tmp_path),
        "--batch-size",
        "1",
    )
    assert code == 0, err
    summary = check_layers_json(tmp_path / "layers.json", 2, depth=2)
    # Without a mask token the ISTA output is sparse; the input is dense.
    assert summary["layers"][0]["sparsity"]["mean"] == 1.0
    assert summary["layers"][-1]["sparsity"]["mean"] < 1.0
    for name in (
        "layers",
        "attention-astronaut",
        "attention-coffee",
        "pca-astronaut",
        "pca-coffee",
    ):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name


@pytest.mark.slow  # ~6 s; quick: test_image_path's analyze --data and the photos test here
def test_analyze_demo_data(demo_checkpoint: Path, tmp_path: Path) -> None:
    code, err = run_cli(
        "--checkpoint",
        str(demo_checkpoint),
        "--data",
        "demo:val",
        "--num-images",
        "16",
        "--batch-size",
        "6",
        "--pictures",
        "2",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    check_layers_json(tmp_path / "layers.json", 16, depth=2)
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == [
        "attention-sample-0000.png",
        "attention-sample-0001.png",
        "layers.png",
        "pca-sample-0000.png",
        "pca-sample-0001.png",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{ckpt} {dir}/nope.jpg", "{dir}/nope.jpg: image not found"),
        ("{ckpt} {photo} --pca-layer 7", "--pca-layer 7: the model has layers 0..1"),
        ("{ckpt} --num-images 4", "give image files or --data SHARDS"),
        ("{ckpt} {photo} --data demo:val", "give image files or --data SHARDS"),
        ("{dir}/missing {photo}", "{dir}/missing: no such checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    demo_checkpoint: Path, photos: list[Path], tmp_path: Path, args: str, message: str
) -> None:
    values = {"ckpt": str(demo_checkpoint), "dir": str(tmp_path), "photo": str(photos[0])}
    argv = args.format(**values).split()
    code, err = run_cli("--checkpoint", *argv, "--out", str(tmp_path / "out"))
    assert code == 2, err
    assert err.startswith(f"error: {message.format(**values)}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib_names_the_package(
    demo_checkpoint: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code, err = run_cli("--checkpoint", str(demo_checkpoint), str(photos[0]))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "pip install 'cratemae[plot]'" in err


def test_without_checkpoint_the_newest_run_is_used(
    demo_checkpoint: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(str(photos[0]))
    assert code == 2
    assert err == ("error: no --checkpoint given and no run with a checkpoint under ./runs: "
                   "pass --checkpoint CKPT\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_checkpoint.parent.parent)
    code, err = run_cli(str(photos[0]))
    assert code == 0, err
    assert "using runs/demo/checkpoints/" in err
    assert (tmp_path / "analysis" / "layers.json").is_file()
