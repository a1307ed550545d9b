"""`cratemae export`: a directory in timm's Hub layout (model.safetensors, config.json,
README.md) read back by cratemae and by timm's `local-dir:`, ONNX checked with onnxruntime,
wrapper prefixes dropped, mismatched weights refused, explicit timm registration."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support import cli

from cratemae.checkpoints import read_model_weights, write_model_weights
from cratemae.model import create_model
from cratemae.weights.graph import EXPORT_TOLERANCE
from cratemae.weights.load import load_model


def images(config: dict, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, config["img_size"], config["img_size"], generator=g)


@pytest.fixture(scope="module")
def exported(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo checkpoint exported whole and encoder-only."""
    out = {}
    for name, extra in (("full", []), ("encoder", ["--encoder-only"])):
        out[name] = tmp_path_factory.mktemp(f"export-{name}")
        run = cli("export", demo_checkpoint, "--out", out[name], *extra)
        assert run.exit_code == 0, run.output
    return out


def test_export_writes_weights_config_and_their_sha256(demo_checkpoint, exported) -> None:
    original, config = read_model_weights(demo_checkpoint)
    for name, out in exported.items():
        file = out / "model.safetensors"
        weights, written_config = read_model_weights(file)
        wanted = {k for k in original if name == "full" or k.startswith("encoder.")}
        assert set(weights) == wanted
        assert all(torch.equal(weights[k], original[k]) for k in wanted)
        record = json.loads((out / "config.json").read_text())
        assert record["model"] == written_config == config
        assert record["mean"] == [0.5] * 3 and record["std"] == [0.25] * 3  # the demo recipe's
        assert record["encoder_only"] is (name == "encoder")
        assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_export_prints_the_sha256(demo_checkpoint, tmp_path) -> None:
    run = cli("export", demo_checkpoint.parent.parent, "--out", tmp_path)  # a run directory
    assert run.exit_code == 0, run.output
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert f"sha256 {digest}  model.safetensors" in run.stdout


def test_exports_load_back_in_cratemae(demo_checkpoint, exported) -> None:
    reference = load_model(demo_checkpoint).model
    x = images(reference.config.to_dict(), 2)
    full = load_model(exported["full"])
    encoder = load_model(exported["encoder"] / "model.safetensors")
    assert type(full.model).__name__ == "CrateMAE"
    assert type(encoder.model).__name__ == "CrateEncoder"
    assert (full.mean, full.std) == ((0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        expected = reference.forward_features(x)
        assert torch.equal(full.model.forward_features(x), expected)
        assert torch.equal(encoder.model.forward_features(x), expected)


def test_wrapper_prefixes_never_reach_the_file(demo_checkpoint, tmp_path) -> None:
    weights, config = read_model_weights(demo_checkpoint)
    wrapped = {f"module._orig_mod.{k}" if i % 2 else f"_orig_mod.{k}": v
               for i, (k, v) in enumerate(weights.items())}
    write_model_weights(tmp_path / "wrapped.safetensors", wrapped, config)
    run = cli("export", tmp_path / "wrapped.safetensors", "--out", tmp_path / "out")
    assert run.exit_code == 0, run.output
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        written = list(f.keys())  # the raw file: read_model_weights would strip prefixes
    assert set(written) == set(weights)


@pytest.mark.parametrize("damage", ["config", "missing key", "shape"])
def test_weights_not_matching_their_config_are_refused(demo_checkpoint, tmp_path, damage) -> None:
    weights, config = read_model_weights(demo_checkpoint)
    if damage == "config":
        config = {**config, "depth": config["depth"] + 1}
    elif damage == "missing key":
        weights.pop("encoder.norm.weight")
    else:
        weights["decoder_pred.bias"] = torch.zeros(5)
    source = write_model_weights(tmp_path / "bad.safetensors", weights, config)
    run = cli("export", source, "--out", tmp_path / "out")
    assert run.exit_code == 2
    expected = ("its configuration says depth" if damage == "config"
                else "does not match the model")
    assert run.stderr.startswith(f"error: {source}: {expected}")
    assert len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_fine_tuned_classifier_exports_with_its_head(demo_checkpoint, tmp_path) -> None:
    import timm

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    _, config = read_model_weights(demo_checkpoint)
    classifier = create_model("crate_mae_tiny", **config).encoder.eval()
    classifier.reset_classifier(5)
    state = classifier.state_dict()
    state |= {f"ema.{k}": torch.zeros_like(v) for k, v in classifier.state_dict().items()}
    source = write_model_weights(tmp_path / "finetuned.safetensors", state, config)
    run = cli("export", source, "--out", tmp_path / "out")
    assert run.exit_code == 0, run.output
    written, _ = read_model_weights(tmp_path / "out" / "model.safetensors")
    assert "encoder.head.weight" in written and not any("ema." in k for k in written)
    entry = json.loads((tmp_path / "out" / "config.json").read_text())["timm"]
    file = str(tmp_path / "out" / "model.safetensors")
    model = timm.create_model(entry["model_name"], pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=file, num_classes=5),
                              **entry["kwargs"])
    x = images(config, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(x))


@pytest.mark.parametrize("which", ["full", "encoder"])
def test_timm_builds_a_classifier_from_an_export(demo_checkpoint, exported, which) -> None:
    import timm

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    record = json.loads((exported[which] / "config.json").read_text())
    file = exported[which] / "model.safetensors"
    model = timm.create_model(record["timm"]["model_name"], pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(file)),
                              **record["timm"]["kwargs"])
    reference = load_model(demo_checkpoint).model
    x = images(record["model"], 2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x))
        assert model(x).shape == (2, 7)


def test_timm_refuses_hyper_parameters_the_weights_were_not_trained_with(exported) -> None:
    import timm

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    record = json.loads((exported["encoder"] / "config.json").read_text())
    file = str(exported["encoder"] / "model.safetensors")
    for field, value in (("ista_lambda", 0.1), ("num_heads", 2)):
        with pytest.raises(ValueError, match=f"{field}="):
            timm.create_model(record["timm"]["model_name"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=file),
                              **{**record["timm"]["kwargs"], field: value})


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_registration_is_explicit_and_the_cli_loads_neither_torch_nor_timm() -> None:
    code = ("import sys, cratemae, cratemae.weights\n"
            "from cratemae.commands.app import build_app\n"
            "from typer.testing import CliRunner\n"
            "assert CliRunner().invoke(build_app(), ['--help']).exit_code == 0\n"
            "loaded = sorted({'torch', 'timm'} & set(sys.modules))\n"
            "assert not loaded, f'loaded {loaded}'\n"
            "hooks = [f for f in sys.meta_path if 'cratemae' in type(f).__module__]\n"
            "assert not hooks, hooks\n"
            "import timm\n"
            "assert timm.list_models('crate_mae_*') == [], 'registered without asking'\n"
            "import cratemae.weights.timm_models\n"
            "print(sorted(timm.list_models('crate_mae_*')))")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    names = ["crate_mae_base", "crate_mae_large", "crate_mae_small", "crate_mae_tiny"]
    assert proc.stdout.strip() == str(names)


def _module_level_imports(path: Path) -> list[str]:
    """What a module imports when it is imported: its top-level `import` statements (those
    under `if TYPE_CHECKING:` aside), as module names (`from a import b`: `a.b` when that
    is a module of cratemae, else `a`)."""
    import ast

    import cratemae

    root = Path(cratemae.__file__).parent.parent
    found: list[str] = []
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            body += node.orelse
        elif isinstance(node, ast.If | ast.Try):
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    root / Path(*sub.split(".")) / "__init__.py").is_file()
                found.append(sub if is_module else node.module)
    return found


def test_the_cli_imports_neither_torch_nor_timm_and_nothing_registers_timm_models() -> None:
    """The quick twin of the subprocess test above, read from the source: what the command
    line imports to start (cratemae, the app, every command module, and all they import at
    module level, transitively) holds no torch or timm, and no module of cratemae imports
    cratemae.weights.timm_models (registering is the user's import)."""
    from importlib import metadata

    import cratemae

    root = Path(cratemae.__file__).parent.parent

    def file_of(module: str) -> Path | None:
        base = root / Path(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    commands = [ep.value.split(":")[0]
                for ep in metadata.entry_points(group="cratemae.commands")]
    todo, seen, outside = ["cratemae", "cratemae.commands.app", *commands], set(), set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c imports a and a.b first
            name = ".".join(parts[:i])
            if name in seen:
                continue
            seen.add(name)
            file = file_of(name)
            for imported in _module_level_imports(file) if file else []:
                if imported.startswith("cratemae"):
                    todo.append(imported)
                else:
                    outside.add(imported.split(".")[0])
    assert not {"torch", "timm"} & outside, sorted(outside)
    assert "cratemae.commands.export" in seen
    import ast

    for path in (root / "cratemae").rglob("*.py"):  # anywhere in the file, functions too
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            assert "cratemae.weights.timm_models" not in names, path


def test_timm_presets_have_the_published_sizes() -> None:
    import timm

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    # Encoder-only parameter counts from the notes (without the frozen position table).
    expected = {"crate_mae_tiny": (5_627_904, 384), "crate_mae_small": (12_423_168, 576)}
    for name, (count, width) in expected.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = timm.create_model(name, num_classes=3)
        head = 3 * width + 3
        assert sum(p.numel() for p in model.parameters()) == count + head
        assert model.pretrained_cfg["num_classes"] == 3  # the model built (no weights)
    model = timm.create_model("crate_mae_tiny", num_classes=3)
    with torch.no_grad():  # initialised as the authors do: finite, dictionaries included
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model's weights file: the ONNX checks need no training."""
    torch.manual_seed(0)
    model = create_model("crate_mae_tiny", img_size=32, patch_size=8, embed_dim=64, num_heads=2,
                         depth=2, decoder_embed_dim=64, decoder_num_heads=2, decoder_depth=1)
    return write_model_weights(tmp_path_factory.mktemp("small") / "model.safetensors",
                               model.state_dict(), model.config.to_dict())


@pytest.mark.parametrize("previous", [False, True])
def test_onnx_over_tolerance_writes_nothing_and_keeps_a_previous_export(
    small_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bool
) -> None:
    import cratemae.weights.graph as graph_mod

    out = tmp_path / "out"
    before = {}
    if previous:  # an earlier export in the same place
        out.mkdir()
        before = {"model.onnx": b"previous onnx",
                  "config.json": b'{"format": "cratemae", "previous": true}\n'}
        for name, data in before.items():
            (out / name).write_bytes(data)
    monkeypatch.setattr(graph_mod, "EXPORT_TOLERANCE", -1.0)  # any difference is too much
    run = cli("export", small_weights, "--out", out, "--format", "onnx")
    assert run.exit_code == 1, run.output
    assert len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith(f"error: {out / 'model.onnx'}: onnxruntime differs from PyTorch")
    assert run.stderr.rstrip().endswith("not written")
    # nothing new, no temporary; an earlier export is left whole
    found = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    assert found == before


def test_onnx_export_function_keeps_the_previous_file_when_over_tolerance(
    small_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cratemae.weights.graph as graph_mod
    import cratemae.weights.onnx as onnx_mod
    from cratemae.errors import CrateMAEError

    encoder = load_model(small_weights).encoder
    result = onnx_mod.export_onnx(encoder, tmp_path / "model.onnx")  # within tolerance
    assert result.file == tmp_path / "model.onnx" and result.max_scaled <= EXPORT_TOLERANCE
    good = result.file.read_bytes()
    with torch.no_grad():
        encoder.norm.weight.mul_(-1)  # a different model: its export must not replace the file
    monkeypatch.setattr(graph_mod, "EXPORT_TOLERANCE", -1.0)
    with pytest.raises(CrateMAEError, match="not written"):
        onnx_mod.export_onnx(encoder, tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert result.file.read_bytes() == good


# --- timm's Hub layout: local-dir: / hf-hub: ---------------------------------------------------
@pytest.mark.parametrize("which", ["full", "encoder"])
def test_local_dir_loads_an_export_with_no_other_argument(demo_checkpoint, exported,
                                                          which) -> None:
    import timm
    from timm.data import resolve_data_config

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    model = timm.create_model(f"local-dir:{exported[which]}", pretrained=True).eval()
    reference = load_model(demo_checkpoint).model
    x = images(reference.config.to_dict(), 3)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x),
                                   rtol=0, atol=1e-6)
    data = resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 32, 32)  # the demo's size, not 224
    assert tuple(data["mean"]) == (0.5,) * 3 and tuple(data["std"]) == (0.25,) * 3
    assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic"
    record = json.loads((exported[which] / "config.json").read_text())
    assert record["architecture"] == record["timm"]["model_name"] and record["num_classes"] == 0
    assert record["num_features"] == 64
    assert {k: record["model"][k] for k in record["model_args"] if k != "global_pool"} == {
        k: v for k, v in record["model_args"].items() if k != "global_pool"}
    assert load_model(exported[which]).config == reference.config  # and cratemae reads it


def test_a_classifier_export_keeps_its_head_and_class_names(demo_checkpoint, tmp_path) -> None:
    import timm

    from cratemae.weights import timm_models  # noqa: F401  (registers crate_mae_*)

    _, config = read_model_weights(demo_checkpoint)
    torch.manual_seed(0)
    classifier = create_model("crate_mae_tiny", **config).encoder.eval()
    classifier.reset_classifier(3, global_pool="avg")  # the weights file does not say "avg"
    run = tmp_path / "run"  # a fine-tuning run directory: RUN/checkpoints/step-N/...
    source = write_model_weights(run / "checkpoints" / "step-000000004" / "model.safetensors",
                                 classifier.state_dict(), config)
    (source.parent / "meta.json").write_text(json.dumps(
        {"recipe_toml": '[data]\ntrain = "pets/train"\n\n[finetune]\npool = "avg"\n'}))
    names = ["cat", "dog", "eel"]
    (run / "finetune.json").write_text(json.dumps({"top1": 91.5, "class_names": names}))
    result = cli("export", source, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert model.num_classes == 3 and model.global_pool == "avg"
    assert model.pretrained_cfg["label_names"] == names
    x = images(config, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(x), rtol=0, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "91.5" in card and "finetune.json" in card and "Classes: 3; pooling `avg`" in card
    assert "train: `pets/train`" in card


def test_the_model_card_says_what_the_weights_are(exported) -> None:
    card = (exported["full"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    for text in ("crate_mae_tiny", "width 64, 2 layers", "Parameters:", "mean [0.5, 0.5, 0.5]",
                 'timm.create_model("local-dir:PATH", pretrained=True)', "Written by: `cratemae",
                 "```toml", "TODO: state the licence"):
        assert text in card, text


def test_export_files_are_readable_by_others_under_umask_022(demo_checkpoint, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        run = cli("export", demo_checkpoint, "--out", tmp_path / "out")
    finally:
        os.umask(old)
    assert run.exit_code == 0, run.output
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    for name in files:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_a_missing_onnx_package_is_one_line_naming_the_extra(
        demo_checkpoint: Path, tmp_path: Path, monkeypatch, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # the import fails as if not installed
    out = tmp_path / "onnx"
    run = cli("export", demo_checkpoint, "--out", out, "--format", "onnx")
    if package == "onnx":  # nothing can be written: refused before the folder is made
        assert run.exit_code != 0
        assert run.stderr == ("error: export --format onnx needs the onnx package, which is "
                              "not installed: pip install 'cratemae[onnx]'\n")
        assert not out.exists()
    else:  # written, unchecked, and the warning says what to install
        assert run.exit_code == 0, run.output
        assert "pip install 'cratemae[onnx]'" in run.stderr
        assert "Traceback" not in run.output and (out / "model.onnx").is_file()
