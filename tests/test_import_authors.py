"""`cratemae import-authors`: the authors' weights, from safetensors, MAE's .pth or a bare
state dict, become a cratemae checkpoint that computes what their code computed."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support import cli

from cratemae.checkpoints import read_model_weights
from cratemae.model import unpatchify
from cratemae.viz.reconstruction import reconstruct
from cratemae.weights.load import load_model

# The authors' weights and outputs on a small configuration (tests/data/REFERENCE.md).
REFERENCE = Path(__file__).resolve().parent / "data" / "official-crate-mae-tiny.safetensors"
TOL = dict(atol=1e-4, rtol=1e-4)  # float32 on a CPU; the reference README says ~1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    tensors = load_file(str(REFERENCE))
    return {part: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(part + ".")}
            for part in ("model", "io")}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported")
    run = cli("import-authors", REFERENCE, "--out", out, "--preset", "crate_mae_tiny")
    assert run.exit_code == 0, run.output
    return out


def check_outputs(ckpt: Path, io: dict[str, torch.Tensor]) -> None:
    model = load_model(ckpt).model
    with torch.no_grad():
        out = model(io["imgs"], mask_ratio=0.75, noise=io["noise"])
        features = model.forward_features(io["imgs"])
    assert torch.equal(out.mask, io["mask"])
    torch.testing.assert_close(out.pred, io["pred"], **TOL)
    torch.testing.assert_close(out.latent, io["latent"], **TOL)
    torch.testing.assert_close(features, io["features"], **TOL)
    torch.testing.assert_close(out.loss.reshape(1), io["loss"], **TOL)


def test_imported_reference_computes_the_stored_outputs(imported, reference) -> None:
    check_outputs(imported, reference["io"])
    _, config = read_model_weights(imported)
    assert (config["embed_dim"], config["num_heads"], config["depth"], config["img_size"],
            config["patch_size"], config["ista_lambda"]) == (64, 4, 2, 32, 4, 0.5)


def test_reconstruct_reproduces_the_stored_prediction(imported, reference) -> None:
    io, loaded = reference["io"], load_model(imported)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    pixels = io["imgs"] * std + mean  # what the normalisation turns back into io.imgs
    results = reconstruct(loaded.model, pixels, mean=loaded.mean, std=loaded.std,
                          mask_ratio=0.75, noise=io["noise"])
    expected = (unpatchify(io["pred"], 4, (8, 8)) * std + mean).clamp(0, 1)
    for i, rec in enumerate(results):
        torch.testing.assert_close(rec.prediction, expected[i], **TOL)
        assert torch.equal(rec.mask, io["mask"][i])


def mae_checkpoint(state: dict[str, torch.Tensor], **extra: object) -> dict[str, object]:
    """A checkpoint as MAE's `misc.save_model` writes it."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(3)
    optimizer.step()
    args = argparse.Namespace(model="mae_crate_tiny", input_size=32, mask_ratio=0.75,
                              norm_pix_loss=False, batch_size=64, output_dir="./out")
    return {"model": state, "optimizer": optimizer.state_dict(), "epoch": 799,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12},
            "args": args, **extra}


@pytest.mark.parametrize("layout", ["mae", "bare"])
def test_pth_files_import_to_the_same_weights(imported, reference, tmp_path, layout) -> None:
    state = reference["model"]
    path = tmp_path / "checkpoint.pth"
    torch.save(mae_checkpoint(state) if layout == "mae" else state, path)
    run = cli("import-authors", path, "--out", tmp_path / "out", "--num-heads", 4)
    assert run.exit_code == 0, run.output
    assert ("MAE checkpoint" if layout == "mae" else "state dict") in run.stdout
    got, _ = read_model_weights(tmp_path / "out")
    want, _ = read_model_weights(imported)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    check_outputs(tmp_path / "out", reference["io"])


class NotAllowed:
    """Any class outside torch's and argparse.Namespace: weights_only must refuse it."""

    def __init__(self) -> None:
        self.payload = "would run code on load"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pth_asking_for_other_globals_is_refused(reference, tmp_path, zip_format) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save(mae_checkpoint(reference["model"], extra=NotAllowed()), path,
               _use_new_zipfile_serialization=zip_format)
    run = cli("import-authors", path, "--out", tmp_path / "out", "--num-heads", 4)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"error: {path}: refused: the file asks to load ")
    assert "NotAllowed" in run.stderr and "argparse.Namespace is allowed" in run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


class _Runs:
    """A pickle that would call `eval` on load."""

    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_a_protocol_4_pickle_is_refused_naming_its_global(tmp_path) -> None:
    """torch's reader stops at protocol 4's FRAME opcode, before it names the global, and
    its warning and message came out as they were (two lines, cut mid-sentence)."""
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Runs(), protocol=4))
    run = cli("import-authors", path, "--out", tmp_path / "out")
    assert run.exit_code == 2
    assert run.stderr == (f"error: {path}: refused: the file asks to load builtins.eval; only "
                          "argparse.Namespace is allowed (weights_only=True, no unsafe "
                          "fallback)\n")
    assert not (tmp_path / "out").exists()


def test_without_the_number_of_heads_a_width_unlike_the_preset_is_an_error(
    reference, tmp_path
) -> None:
    path = tmp_path / "state.pth"
    torch.save(reference["model"], path)
    run = cli("import-authors", path, "--out", tmp_path / "out")  # preset base: 768 wide
    assert run.exit_code == 2
    assert "the weights are 64 wide but crate_mae_base is 768" in run.stderr


def test_unknown_or_missing_keys_are_refused(reference, tmp_path) -> None:
    state = dict(reference["model"])
    state["blocks.0.extra.weight"] = torch.zeros(2)
    del state["norm.weight"]
    path = tmp_path / "state.pth"
    torch.save(state, path)
    run = cli("import-authors", path, "--out", tmp_path / "out", "--num-heads", 4)
    assert run.exit_code == 2
    assert run.stderr == f"error: {path}: 1 key(s) in no known layout: blocks.0.extra.weight\n"
    del state["blocks.0.extra.weight"]
    torch.save(state, path)
    run = cli("import-authors", path, "--out", tmp_path / "out", "--num-heads", 4)
    assert run.exit_code == 2
    assert run.stderr == f"error: {path}: does not match the model: 1 missing key: " \
                         "encoder.norm.weight\n"
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line_of_error(tmp_path) -> None:
    for name, data in (("junk.pth", b"hello"), ("junk.safetensors", b"\x08\x00" * 9)):
        (tmp_path / name).write_bytes(data)
        run = cli("import-authors", tmp_path / name, "--out", tmp_path / "out")
        assert run.exit_code == 2
        assert run.stderr.startswith(f"error: {tmp_path / name}: not a ")
        assert len(run.stderr.splitlines()) == 1


def test_ista_lambda_option_changes_the_model(reference, tmp_path) -> None:
    run = cli("import-authors", REFERENCE, "--out", tmp_path, "--ista-lambda", 5.0)
    assert run.exit_code == 0, run.output
    assert read_model_weights(tmp_path)[1]["ista_lambda"] == 5.0
    with pytest.raises(AssertionError):
        check_outputs(tmp_path, reference["io"])


def test_every_command_accepts_the_import(imported, reference, tmp_path) -> None:
    image = tmp_path / "input.png"
    pixels = (reference["io"]["imgs"][0].permute(1, 2, 0) * 0.2 + 0.45).clamp(0, 1)
    Image.fromarray((pixels.numpy() * 255).astype(np.uint8)).save(image)
    run = cli("reconstruct", image, "--checkpoint", imported, "--out", tmp_path / "r.png")
    assert run.exit_code == 0, run.output
    assert "assuming" not in run.stderr  # the import records the authors' preprocessing
    run = cli("export", imported, "--out", tmp_path / "onnx", "--format", "onnx")
    assert run.exit_code == 0, run.output
