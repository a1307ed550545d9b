"""`cratemae embed`: features of every sample out of a frozen encoder, streamed to a file in
chunks, the same as the encoder's own forward, resumable, and refused in one line when the
input is wrong."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support import cli

import cratemae.eval.embed as embed_mod
from cratemae.checkpoints import write_model_weights
from cratemae.data.decode import load_rgb
from cratemae.data.transforms import eval_transform
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.eval.embed import EmbedSettings, embed, parts_dir
from cratemae.eval.embed_data import data_source
from cratemae.eval.embeddings import read_embeddings
from cratemae.model import CrateMAEConfig, build_model
from cratemae.weights.export import timm_call
from cratemae.weights.load import checkpoint_digest, load_encoder

AUTHORS = Path(__file__).resolve().parent / "data" / "official-crate-mae-tiny.safetensors"
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
N_IMAGES = 11  # odd: with two ranks, one repeats a sample


def _checkpoint(path: Path, **config: object) -> Path:
    torch.manual_seed(0)
    c = CrateMAEConfig(**{**TINY, **config})
    return write_model_weights(path, build_model(c).state_dict(), c.to_dict())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "crate.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders of PNG images of assorted sizes (a resize and a crop for each)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / ("cat" if i % 3 else "dog")
        d.mkdir(exist_ok=True)
        h, w = 30 + 5 * (i % 4), 36 + 7 * (i % 3)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("cat/*.png")) + sorted(folder.glob("dog/*.png"))


def _reference(checkpoint: Path, files: list[Path]) -> tuple[torch.Tensor, torch.nn.Module]:
    """The encoder's own forward on the images, preprocessed one by one, in one batch."""
    loaded = load_encoder(checkpoint)
    tf = eval_transform(loaded.config.img_size, loaded.mean, loaded.std)
    rng = np.random.default_rng(0)  # the evaluation transform draws nothing
    images = torch.stack([tf(load_rgb(Image.open(f)), rng) for f in files])  # (N, 3, S, S)
    return images, loaded.encoder


def _embed(checkpoint: Path, data: list[str], out: Path, overwrite: bool = False,
           **kw: object) -> embed_mod.EmbedResult:
    settings = EmbedSettings(**{"batch_size": 4, "num_workers": 0, **kw})  # type: ignore[arg-type]
    loaded = load_encoder(checkpoint)
    identity = {"architecture": timm_call(loaded.config)["model_name"],
                "checkpoint_sha256": checkpoint_digest(checkpoint),
                "model": loaded.config.to_dict()}
    return embed(loaded.encoder, data_source(data), out, settings, mean=loaded.mean,
                 std=loaded.std, identity=identity, device=torch.device("cpu"),
                 overwrite=overwrite)


# --- what is written --------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_features_are_the_encoders_own_forward(ckpt, folder, tmp_path, pool) -> None:
    out = tmp_path / "f.safetensors"
    _embed(ckpt, [str(folder)], out, pool=pool, layers=(0, -2))
    feats, labels, keys, meta = read_embeddings(out)
    images, encoder = _reference(ckpt, _files(folder))
    with torch.no_grad():
        tokens = encoder.forward_features(images)  # (N, 1+L, d)
        inter = encoder.forward_intermediates(images, [0, 1], norm=True, output_fmt="NLC",
                                               return_prefix_tokens=True, intermediates_only=True)
    want = tokens[:, 1:].mean(1) if pool == "avg" else tokens[:, 0]
    torch.testing.assert_close(feats, want, atol=1e-6, rtol=0)
    for i, (patches, prefix) in enumerate(inter):
        layer = read_embeddings(out, layer=i)[0]
        torch.testing.assert_close(layer, patches.mean(1) if pool == "avg" else prefix[:, 0],
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(read_embeddings(out, layer=-2)[0], read_embeddings(out, layer=1)[0])
    assert keys == [str(f) for f in _files(folder)]
    assert labels.tolist() == [0 if f.parent.name == "cat" else 1 for f in _files(folder)]
    assert (meta["pool"], meta["layer"], meta["layers"]) == (pool, 2, [0, 1])
    assert meta["classes"] == ["cat", "dog"] and meta["num_samples"] == N_IMAGES


def test_features_are_the_probes_own_feature_pass(ckpt, folder, tmp_path) -> None:
    from cratemae.distributed.precision import resolve_precision
    from cratemae.eval.features import FeatureSpec, extract_features
    from cratemae.recipe.schema import DataSection

    out = tmp_path / "f.safetensors"
    _embed(ckpt, [str(folder)], out, pool="avg", layers=(0,))
    loaded = load_encoder(ckpt)
    data = DataSection(val=str(folder), batch_size=4, num_workers=0, mean=loaded.mean,
                       std=loaded.std)
    for layer in (-1, 0):
        spec = FeatureSpec(layer, "avg", 32, resolve_precision("fp32", torch.device("cpu")))
        probe = extract_features(loaded.encoder, data, "val", spec)
        feats, labels, _, _ = read_embeddings(out, None if layer == -1 else layer)
        torch.testing.assert_close(feats, probe.features, atol=1e-6, rtol=0)
        assert torch.equal(labels, probe.labels)


def test_metadata_names_the_model_and_the_checkpoints_digest(ckpt, folder, tmp_path) -> None:
    out = tmp_path / "f.safetensors"
    _embed(ckpt, [str(folder)], out)
    meta = read_embeddings(out)[3]
    assert meta["checkpoint_sha256"] == checkpoint_digest(ckpt)
    assert meta["architecture"] == "crate_mae_tiny" and meta["model"]["depth"] == 3
    assert meta["img_size"] == 32 and meta["format"] == "cratemae-embeddings/1"
    plain = load_file(out)  # a standard safetensors file for any tool
    assert set(plain) == {"features", "labels", "valid", "keys", "key_offsets"}


def test_chunked_equals_one_shot_to_the_byte(ckpt, folder, tmp_path, monkeypatch) -> None:
    written = []
    real = embed_mod.write_chunk
    monkeypatch.setattr(embed_mod, "write_chunk",
                        lambda path, rows, tag: (written.append(path.name),
                                                 real(path, rows, tag)))
    _embed(ckpt, [str(folder)], tmp_path / "chunked.safetensors", chunk_size=3)
    assert len(written) == 3  # 11 samples, batches of 4, a chunk per batch
    assert not parts_dir(tmp_path / "chunked.safetensors").exists()
    _embed(ckpt, [str(folder)], tmp_path / "whole.safetensors", chunk_size=1000)
    assert (tmp_path / "chunked.safetensors").read_bytes() == \
        (tmp_path / "whole.safetensors").read_bytes()


def test_the_same_input_gives_the_same_bytes_with_workers(ckpt, folder, tmp_path) -> None:
    """Two worker processes: batches arrive interleaved from two streams, and are put back
    in data-set order."""
    for name in ("a", "b"):
        _embed(ckpt, [str(folder)], tmp_path / f"{name}.safetensors", num_workers=2,
               chunk_size=4)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert read_embeddings(tmp_path / "a.safetensors")[2] == [str(f) for f in _files(folder)]


def test_npy_format_holds_the_same_arrays(ckpt, folder, tmp_path) -> None:
    _embed(ckpt, [str(folder)], tmp_path / "f.safetensors", layers=(1,))
    _embed(ckpt, [str(folder)], tmp_path / "npy", layers=(1,), format="npy")
    assert (tmp_path / "npy" / "features.npy").is_file()
    assert np.load(tmp_path / "npy" / "layers.1.npy").shape == (N_IMAGES, 32)
    for layer in (None, 1):
        a, b = read_embeddings(tmp_path / "f.safetensors", layer), read_embeddings(
            tmp_path / "npy", layer)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
        assert {k: v for k, v in b[3].items() if k not in ("arrays", "keys")} == a[3]
    assert read_embeddings(tmp_path / "npy")[3]["checkpoint_sha256"] == checkpoint_digest(ckpt)
    _embed(ckpt, [str(folder)], tmp_path / "npy", format="npy", overwrite=True)  # no layers
    assert not (tmp_path / "npy" / "layers.1.npy").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_file_lists_have_keys_and_no_labels(ckpt, folder, tmp_path) -> None:
    files = _files(folder)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(f) for f in files[2:]) + "\n")
    out = tmp_path / "f.safetensors"
    _embed(ckpt, [str(files[0]), str(files[1]), f"@{listing}"], out)
    feats, labels, keys, meta = read_embeddings(out)
    assert keys == [str(f) for f in files] and labels is None and not meta["labelled"]
    images, encoder = _reference(ckpt, files)
    with torch.no_grad():
        torch.testing.assert_close(feats, encoder.forward_features(images)[:, 0], atol=1e-6,
                                   rtol=0)


def test_webdataset_shards_give_their_keys_and_labels(ckpt, tmp_path) -> None:
    from data_fixtures import make_shards

    make_shards(tmp_path / "shards", [3, 4], index=False)  # counts read from the tars
    out = tmp_path / "f.safetensors"
    _embed(ckpt, [str(tmp_path / "shards" / "train-{000000..000001}.tar")], out, num_workers=2)
    feats, labels, keys, meta = read_embeddings(out)
    assert keys == ["s0_0", "s0_1", "s0_2", "s1_3", "s1_4", "s1_5", "s1_6"]
    assert labels.tolist() == list(range(7)) and feats.shape == (7, 32)
    assert meta["classes"] is None


def test_an_unreadable_image_is_marked_and_left_out_by_the_reader(ckpt, folder, tmp_path
                                                                  ) -> None:
    files = [*_files(folder)[:4], tmp_path / "broken.png"]
    files[-1].write_bytes(b"not an image")
    out = tmp_path / "f.safetensors"
    result = _embed(ckpt, [str(f) for f in files], out, max_bad_fraction=0.5)
    assert result.bad_samples == 1
    feats, _, keys, _ = read_embeddings(out)
    assert keys == [str(f) for f in files[:4]] and feats.shape == (4, 32)
    everything = read_embeddings(out, valid_only=False)
    assert everything[2][-1] == str(files[-1]) and not everything[0][-1].any()


# --- every backbone -----------------------------------------------------------------------
def test_mae_vit_and_the_authors_weights_embed(folder, tmp_path) -> None:
    vit = _checkpoint(tmp_path / "vit.safetensors", family="vit", encoder_visible_only=True)
    tensors = load_file(str(AUTHORS))
    authors = write_model_weights(
        tmp_path / "authors.safetensors",
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        CrateMAEConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                       decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4).to_dict())
    files = _files(folder)
    for checkpoint, arch in ((vit, "vit_tiny_patch16_224"), (authors, "crate_mae_tiny")):
        out = tmp_path / f"{checkpoint.stem}-features.safetensors"
        _embed(checkpoint, [str(folder)], out, pool="avg")
        feats, _, _, meta = read_embeddings(out)
        images, encoder = _reference(checkpoint, files)
        with torch.no_grad():
            want = encoder.forward_features(images)[:, 1:].mean(1)
        torch.testing.assert_close(feats, want, atol=1e-6, rtol=0)
        assert meta["architecture"] == arch


# --- interrupted, resumed, refused --------------------------------------------------------
class _Died(Exception):
    pass


def test_an_interrupted_embed_resumes_to_the_same_bytes(ckpt, folder, tmp_path, monkeypatch
                                                         ) -> None:
    _embed(ckpt, [str(folder)], tmp_path / "whole.safetensors", chunk_size=4)
    out = tmp_path / "f.safetensors"
    real, count = embed_mod.write_chunk, []

    def dies_on_the_third(path: Path, rows: list, tag: str) -> None:
        if len(count) == 2:
            raise _Died
        count.append(path)
        real(path, rows, tag)

    monkeypatch.setattr(embed_mod, "write_chunk", dies_on_the_third)
    with pytest.raises(_Died):
        _embed(ckpt, [str(folder)], out, chunk_size=4)
    assert not out.exists() and len(list(parts_dir(out).rglob("chunk-*"))) == 2
    debris = tmp_path / ".f.safetensors.tmp-999999999-0123abcd"  # a dead writer's
    debris.write_bytes(b"half")
    with pytest.raises(BadInputError, match=r"other settings .*pool"):
        _embed(ckpt, [str(folder)], out, chunk_size=4, pool="avg")
    monkeypatch.setattr(embed_mod, "write_chunk", lambda path, rows, tag: (
        count.append(path), real(path, rows, tag)))
    result = _embed(ckpt, [str(folder)], out, chunk_size=4)
    assert result.resumed_chunks == 2 and len(count) == 3  # only the last chunk computed
    assert out.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert not parts_dir(out).exists() and not debris.exists()


def test_a_stop_signal_ends_the_embed_between_chunks_with_exit_3(ckpt, folder, tmp_path,
                                                                  monkeypatch) -> None:
    _embed(ckpt, [str(folder)], tmp_path / "whole.safetensors", chunk_size=4)
    out, real = tmp_path / "f.safetensors", embed_mod.write_chunk

    def signalled_after_the_first(path: Path, rows: list, tag: str) -> None:
        real(path, rows, tag)
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM signals every process of the job

    monkeypatch.setattr(embed_mod, "write_chunk", signalled_after_the_first)
    with pytest.raises(CrateMAEError, match=r"stopped by SIGTERM after 4 of 11 samples") as err:
        _embed(ckpt, [str(folder)], out, chunk_size=4)
    assert err.value.exit_code == EXIT_REQUEUE
    assert not out.exists() and len(list(parts_dir(out).rglob("chunk-*"))) == 1
    monkeypatch.setattr(embed_mod, "write_chunk", real)
    assert _embed(ckpt, [str(folder)], out, chunk_size=4).resumed_chunks == 1
    assert out.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def _error_line(run) -> str:
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def test_bad_input_is_one_error_line(ckpt, folder, tmp_path) -> None:
    out = tmp_path / "f.safetensors"
    base = ["embed", folder, "--checkpoint", ckpt, "--out", out, "--workers", "0"]
    assert "checkpoint not found" in _error_line(
        cli("embed", folder, "--checkpoint", tmp_path / "nope", "--out", out))
    (tmp_path / "empty").mkdir()
    assert "no" in _error_line(cli("embed", tmp_path / "empty", "--checkpoint", ckpt,
                                   "--out", out))
    assert "valid: -3..2" in _error_line(cli(*base, "--layers", "1,3"))
    assert "separated by commas" in _error_line(cli(*base, "--layers", "one"))
    (tmp_path / "mine").mkdir()
    assert "did not write" in _error_line(cli(*base[:-3], tmp_path / "mine", "--overwrite",
                                              "--format", "npy"))
    assert (tmp_path / "mine").is_dir()
    out.write_text("precious")
    assert "--overwrite" in _error_line(cli(*base))
    assert out.read_text() == "precious"
    run = cli(*base, "--overwrite", "--json")
    assert run.exit_code == 0, run.output
    assert read_embeddings(out)[0].shape == (N_IMAGES, 32)
    assert not parts_dir(out).exists()


def test_the_command_writes_and_summarises(ckpt, folder, tmp_path) -> None:
    import json

    out = tmp_path / "f.safetensors"
    run = cli("embed", folder, "--checkpoint", ckpt, "--out", out, "--workers", "0",
              "--pool", "avg", "--layers", "-1", "--json")
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert summary["num_samples"] == N_IMAGES and summary["pool"] == "avg"
    assert summary["layers"] == [2] and summary["labelled"]
    assert "embed: images:" in run.stderr  # plain progress lines off a terminal
