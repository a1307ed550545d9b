"""The encoder at any image size in every place it goes: one checkpoint and one photograph
through eager PyTorch, timm's `local-dir:`, the ONNX file and the torch.export file agree at
the training size and others; the graphs take dynamic batch, height and width and refuse a
side that is not whole patches; `--image-size` fixes the size; bad sizes and formats are one
error line. The demo model is 32 px at patch 4: its other sizes are 24 and 40 px."""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from support import cli

from cratemae.weights.graph import EXPORT_TOLERANCE, check_cases, other_sizes
from cratemae.weights.load import load_model

ort = pytest.importorskip("onnxruntime")
FORMATS = ("safetensors", "onnx", "pt2")
FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}
PATCH, WIDTH = 4, 64  # the demo model's (tests/support.py TINY_MODEL)


@pytest.fixture(scope="module")
def graphs(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, tuple[Path, str]]:
    """The demo checkpoint exported by the command in each format: (directory, stdout)."""
    out = {}
    for fmt in FORMATS:
        where = tmp_path_factory.mktemp(f"sizes-{fmt}")
        run = cli("export", demo_checkpoint, "--out", where, "--format", fmt)
        assert run.exit_code == 0, run.output
        out[fmt] = (where, run.stdout)
    return out


@pytest.fixture(scope="module")
def runtimes(demo_checkpoint: Path, graphs) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """forward_features four ways: (B, 3, H, W) -> (B, 1+L, d)."""
    import timm

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    eager = load_model(demo_checkpoint).encoder.eval()
    hub = timm.create_model(f"local-dir:{graphs['safetensors'][0]}", pretrained=True).eval()
    session = ort.InferenceSession(str(graphs["onnx"][0] / FILES["onnx"]),
                                   providers=["CPUExecutionProvider"])
    program = torch.export.load(graphs["pt2"][0] / FILES["pt2"]).module()
    return {
        "eager": eager.forward_features,
        "timm local-dir": hub.forward_features,
        "onnx": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
        "pt2": program,
    }


@pytest.fixture(scope="module")
def photo_at(photos: list[Path], demo_checkpoint: Path) -> Callable[[int], torch.Tensor]:
    """The astronaut at `size` px as the model sees it: (1, 3, size, size), normalised with
    the checkpoint's mean and std (the evaluation resize and centre crop)."""
    from PIL import Image

    from cratemae.data.transforms import eval_transform

    loaded = load_model(demo_checkpoint)
    image = Image.open(photos[0]).convert("RGB")

    def at(size: int) -> torch.Tensor:
        transform = eval_transform(size, loaded.mean, loaded.std)
        return transform(image, np.random.default_rng(0))[None]

    return at


def _agree(runtimes, x: torch.Tensor) -> dict[str, float]:
    """Each runtime's largest |out - eager| / (1 + |eager|), after checking the shapes."""
    with torch.no_grad():
        outs = {name: run(x) for name, run in runtimes.items()}
    expected = outs["eager"]
    grid = (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH)
    assert expected.shape == (x.shape[0], 1 + grid, WIDTH)
    found = {}
    for name, out in outs.items():
        assert out.shape == expected.shape, name
        found[name] = float(((out - expected).abs() / (1 + expected.abs())).max())
    return found


def test_every_runtime_agrees_at_a_size_it_was_not_trained_at(runtimes, photo_at) -> None:
    found = _agree(runtimes, photo_at(40))  # 10 x 10 patches; trained on 8 x 8
    assert found["timm local-dir"] == 0.0  # the same module, the same table
    assert max(found.values()) <= EXPORT_TOLERANCE, found


@pytest.mark.slow
def test_every_runtime_agrees_at_three_sizes(runtimes, photo_at) -> None:
    sizes = (32, *other_sizes(32, PATCH))
    assert sizes == (32, 24, 40)
    for size in sizes:
        found = _agree(runtimes, photo_at(size))
        print(f"\n{size} px: {found}")
        assert max(found.values()) <= EXPORT_TOLERANCE, (size, found)
    non_square = photo_at(48)[..., 8:32, :]  # 24 x 48 px: 6 x 12 patches
    assert max(_agree(runtimes, non_square).values()) <= EXPORT_TOLERANCE


def test_the_command_checks_each_graph_at_three_sizes(graphs) -> None:
    assert check_cases(32, PATCH) == [(2, 32, 32), (1, 24, 24), (1, 40, 40), (3, 24, 40)]
    assert check_cases(224, 16)[1:3] == [(1, 160, 160), (1, 288, 288)]
    for fmt, runtime in (("onnx", "onnxruntime"), ("pt2", "torch.export.load")):
        where, stdout = graphs[fmt]
        assert f"dynamic batch, height and width: multiples of {PATCH} px" in stdout
        assert f"checked with {runtime} at 32x32, 24x24, 40x40, 24x40 px" in stdout
        record = json.loads((where / "config.json").read_text())
        assert record[fmt]["dynamic"] == ["batch", "height", "width"]
        assert record[fmt]["multiple_of"] == PATCH and record["file"] == FILES[fmt]


def test_the_onnx_graph_is_dynamic_and_refuses_part_of_a_patch(graphs) -> None:
    session = ort.InferenceSession(str(graphs["onnx"][0] / FILES["onnx"]),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert session.get_outputs()[0].shape == ["batch", "tokens", WIDTH]
    with pytest.raises(Exception, match="cannot be reshaped to the requested shape"):
        session.run(None, {"images": np.zeros((1, 3, 30, 32), np.float32)})


def test_the_pt2_program_holds_torch_ops_only_and_refuses_part_of_a_patch(graphs) -> None:
    program = torch.export.load(graphs["pt2"][0] / FILES["pt2"])
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    foreign = [t for t in targets if not isinstance(t, torch._ops.OpOverload)
               and getattr(t, "__module__", "") not in (operator.__name__, "_operator")]
    assert not foreign  # ATen and integer arithmetic on sizes: nothing of cratemae
    module = program.module()
    with pytest.raises(Exception, match=re.escape(f"images.size()[2] % {PATCH} == 0")):
        module(torch.zeros(1, 3, 30, 32))
    assert module(torch.zeros(3, 3, 8, 64)).shape == (3, 1 + 2 * 16, WIDTH)  # two patches high


@pytest.mark.slow
def test_the_pt2_program_runs_where_cratemae_cannot_be_imported(graphs, tmp_path) -> None:
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.export.load(graphs["pt2"][0] / FILES["pt2"]).module()(x)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    code = ("import sys; sys.modules['cratemae'] = None\n"
            "import torch\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
            f"m = torch.export.load({str(graphs['pt2'][0] / FILES['pt2'])!r}).module()\n"
            "with torch.no_grad(): out = m(io['x'])\n"
            "assert torch.equal(out, io['expected']), (out - io['expected']).abs().max()\n"
            "print(sorted(k for k in sys.modules if k.startswith('cratemae')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['cratemae']"  # only the blocked entry


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("pt2", marks=pytest.mark.slow)])
def test_image_size_fixes_the_graphs_height_and_width(demo_checkpoint, tmp_path, fmt) -> None:
    run = cli("export", demo_checkpoint, "--out", tmp_path, "--format", fmt, "--image-size", 40)
    assert run.exit_code == 0, run.output
    assert "height and width fixed at 40 px" in run.stdout
    assert "at 40x40 px" in run.stdout
    file = tmp_path / FILES[fmt]
    if fmt == "onnx":
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == ["batch", 3, 40, 40]
    else:
        module = torch.export.load(file).module()
        assert module(torch.zeros(2, 3, 40, 40)).shape == (2, 1 + 10 * 10, WIDTH)
        with pytest.raises(Exception):  # noqa: B017 (torch's guard error has no public type)
            module(torch.zeros(1, 3, 32, 32))
    assert json.loads((tmp_path / "config.json").read_text())[fmt]["image_size"] == 40


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format tflite: expected one of safetensors, onnx, pt2"),
    (["--format", "onnx", "--image-size", "0"], "--image-size 0: must be a positive number"),
    (["--format", "pt2", "--image-size", "-8"], "--image-size -8: must be a positive number"),
    (["--format", "onnx", "--image-size", "30"],
     "--image-size 30: not a multiple of the patch size 4 (e.g. 32)"),
    (["--image-size", "32"], "--image-size applies to --format onnx and pt2"),
])
def test_bad_sizes_and_formats_are_one_line_and_write_nothing(demo_checkpoint, tmp_path,
                                                               args, message) -> None:
    out = tmp_path / "out"
    run = cli("export", demo_checkpoint, "--out", out, *args)
    assert run.exit_code == 2, run.output
    assert run.stderr.startswith(f"error: {message}") and len(run.stderr.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_224_px_preset_exports_match_pytorch_at_three_sizes(tmp_path, fmt) -> None:
    """The small preset at 224 px: Base's architecture and sizes at a third of the cost."""
    from cratemae.checkpoints import write_model_weights
    from cratemae.model import create_model

    torch.manual_seed(0)
    model = create_model("crate_mae_small").eval()
    source = write_model_weights(tmp_path / "small.safetensors", model.state_dict(),
                                 model.config.to_dict())
    run = cli("export", source, "--out", tmp_path / fmt, "--format", fmt)
    assert run.exit_code == 0, run.output
    assert "at 224x224, 160x160, 288x288, 160x288 px" in run.stdout
    print(f"\nSmall preset, {fmt}: {run.stdout.splitlines()[-1]}")
    file = tmp_path / fmt / FILES[fmt]
    if fmt == "onnx":
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        run_graph = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
    else:
        run_graph = torch.export.load(file).module()
    for size in (224, 160, 288):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected, got = model.encoder.forward_features(x), run_graph(x)
        scaled = float(((got - expected).abs() / (1 + expected.abs())).max())
        print(f"{size} px: max |diff| {float((got - expected).abs().max()):.1e}, "
              f"scaled {scaled:.1e}")
        assert scaled <= EXPORT_TOLERANCE


def test_a_pt2_over_tolerance_writes_nothing_and_keeps_a_previous_file(
        demo_checkpoint, graphs, tmp_path, monkeypatch) -> None:
    import cratemae.weights.graph as graph_mod
    import cratemae.weights.pt2 as pt2_mod
    from cratemae.errors import CrateMAEError

    program = torch.export.load(graphs["pt2"][0] / FILES["pt2"])  # the demo's, exported once
    monkeypatch.setattr(pt2_mod, "export_program", lambda encoder, image_size=None: program)
    file = tmp_path / FILES["pt2"]
    file.write_bytes(b"previous program")
    monkeypatch.setattr(graph_mod, "EXPORT_TOLERANCE", -1.0)  # any difference is too much
    with pytest.raises(CrateMAEError, match=r"the torch\.export program differs from PyTorch"):
        pt2_mod.export_pt2(load_model(demo_checkpoint).encoder, file)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        FILES["pt2"]: b"previous program"}  # nothing new, no temporary, the old file whole


def test_a_graph_that_fails_at_a_size_is_one_error_line() -> None:
    from cratemae.errors import CrateMAEError
    from cratemae.model import create_model
    from cratemae.weights.graph import compare

    encoder = create_model("crate_mae_tiny", img_size=16, patch_size=8, embed_dim=32,
                           num_heads=2, depth=1, decoder_embed_dim=32, decoder_num_heads=2,
                           decoder_depth=1).encoder

    def frozen(x: torch.Tensor) -> torch.Tensor:  # a graph that kept the training size
        if x.shape[-2:] != (16, 16):
            raise RuntimeError("first line\nAttempting to broadcast an axis: 10 by 5")
        return encoder.forward_features(x)

    with pytest.raises(CrateMAEError) as err:
        compare(frozen, encoder, check_cases(16, 8), name="out/model.onnx")
    assert str(err.value) == ("out/model.onnx: failed at 24x24 px (Attempting to broadcast an "
                              "axis: 10 by 5); not written")
