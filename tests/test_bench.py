"""`cratemae bench`: the check against the reference, the FLOP count, the command end to end.

Speed is never asserted. Everything runs on one CPU thread: the machine may be shared, and
tiny operations on two contended threads wait on each other for milliseconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

from cratemae.bench.speed import CheckFailed, check_paths, forward_flops, loss_functions
from cratemae.commands.app import build_app
from cratemae.distributed.precision import Precision
from cratemae.model import CrateMAE, CrateMAEConfig, preset_config
from cratemae.model.layers import ISTA

TINY_BENCH = ["bench", "--model", "crate_mae_tiny", "--img-size", "32", "--batch-size", "2",
              "--steps", "2", "--warmup", "1", "--device", "cpu"]

CONFIGS = [
    dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4),
    dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, decoder_num_heads=6),
    dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=8, norm_pix_loss=True,
         ista_lambda=0.1, ista_step_size=0.2),
    dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, encoder_visible_only=True),
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(overrides: dict, seed: int = 0) -> CrateMAE:
    values = dict(decoder_depth=overrides["depth"], decoder_num_heads=4) | overrides
    values["decoder_embed_dim"] = values["embed_dim"]
    torch.manual_seed(seed)
    return CrateMAE(CrateMAEConfig(**values))


def _broken_step_matrix(self: ISTA) -> torch.Tensor:
    D = self.dictionary
    return self.step_size * (D - D @ D.t())  # D D^T for D^T D: a plausible slip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_fast_path_passes_the_check(overrides, precision):
    model = _model(overrides)
    imgs = torch.randn(4, 3, 32, 32)
    checks = check_paths(model, loss_functions(model), ["fast", "reference"], imgs,
                         Precision(precision, "cpu", ""))
    assert [c.path for c in checks] == ["fast", "reference"]
    assert all(c.ok for c in checks)
    fast = checks[0]
    if precision == "fp32":  # far inside the fixed tolerance
        assert fast.loss_rel_err < 1e-5 and fast.grad_rel_err < 5e-5 < fast.allowed_grad
    assert model.encoder.cls_token.grad is None  # the check leaves no gradients behind


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_broken_fast_path_fails_the_check(monkeypatch, precision):
    monkeypatch.setattr(ISTA, "step_matrix", _broken_step_matrix)
    model = _model(CONFIGS[0])
    with pytest.raises(CheckFailed, match="fast path does not compute the same"):
        check_paths(model, loss_functions(model), ["fast"], torch.randn(4, 3, 32, 32),
                    Precision(precision, "cpu", ""))


def test_check_refuses_a_step_matrix_off_by_a_thousandth(monkeypatch):
    """The float32 tolerance is loose enough for rounding, not for a slightly wrong constant."""
    step_matrix = ISTA.step_matrix
    monkeypatch.setattr(ISTA, "step_matrix", lambda self: 1.001 * step_matrix(self))
    model = _model(CONFIGS[0])
    with pytest.raises(CheckFailed, match=r"worst gradient rel\. error"):
        check_paths(model, loss_functions(model), ["fast"], torch.randn(4, 3, 32, 32),
                    Precision("fp32", "cpu", ""))


def test_check_catches_a_wrong_visible_only_decoder(monkeypatch):
    model = _model(CONFIGS[-1])
    decode = CrateMAE.decode

    def no_positions(self, latent, ids_keep, mask_tokens):  # mask tokens lose their positions
        return decode(self, latent, ids_keep, self.mask_token.expand_as(mask_tokens))

    monkeypatch.setattr(CrateMAE, "decode", no_positions)
    with pytest.raises(CheckFailed):
        check_paths(model, loss_functions(model), ["fast"], torch.randn(4, 3, 32, 32),
                    Precision("fp32", "cpu", ""))


def test_flops_per_image_match_the_notes():
    """../shared/crate-mae-notes.md: Base at 224 px, forward GFLOP 25.6 (authors'), 20.1
    (one-matmul ISTA), 12.5 (visible-only encoder)."""
    base = preset_config("crate_mae_base")
    visible = preset_config("crate_mae_base", encoder_visible_only=True)
    assert forward_flops(base, algorithm="reference") / 1e9 == pytest.approx(25.6, rel=5e-3)
    assert forward_flops(base) / 1e9 == pytest.approx(20.1, rel=5e-3)
    assert forward_flops(visible) / 1e9 == pytest.approx(12.5, rel=5e-3)


def _invoke(*args: str):
    return CliRunner().invoke(build_app(), [*TINY_BENCH, *args], env={"COLUMNS": "200"})


@pytest.mark.parametrize("encoder", [[], ["--visible-only"]], ids=["full", "visible-only"])
def test_bench_command_prints_speed_after_the_check(encoder):
    run = _invoke("--reference", *encoder)
    assert run.exit_code == 0, run.output
    out = run.stdout
    assert re.search(r"check fast .*: ok", out) and re.search(r"check reference .*: ok", out)
    assert re.search(r"^fast +[\d,.]+ img/s \(min [\d,.]+, max [\d,.]+\)", out, re.M)
    assert re.search(r"^reference +[\d,.]+ img/s", out, re.M)
    assert "GiB" in out and "TFLOP/s" in out and "GFLOP/image" in out
    assert re.search(r"fast / reference: [\d.]+x", out)


def test_bench_command_json():
    run = _invoke("--json", "--visible-only")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["spec"]["visible_only"] and result["spec"]["precision_in_effect"] == "fp32"
    assert result["checks"]["fast"]["ok"]
    fast = result["paths"]["fast"]
    assert fast["images_per_s_min"] <= fast["images_per_s"] <= fast["images_per_s_max"]
    for key in ("peak_memory_gib", "tflop_per_s", "gflop_per_image", "step_ms_median"):
        assert fast[key] > 0
    assert "reference" not in result["paths"] and "speedup" not in result


def test_bench_refuses_to_time_a_broken_fast_path(monkeypatch):
    monkeypatch.setattr(ISTA, "step_matrix", _broken_step_matrix)
    run = _invoke("--reference")
    assert run.exit_code == 1
    assert "does not compute the same loss and gradients" in run.output
    assert "no speed reported" in run.output
    assert "img/s" not in run.stdout


def test_bench_help_shows_the_examples():
    from test_cli import joined_examples  # a long example is shown with a continuation

    from cratemae.commands.bench import bench

    doc = (bench.__doc__ or "").splitlines()
    assert doc[0].startswith("Time complete training steps")
    examples = [e for e in joined_examples(doc) if e.startswith("$ cratemae bench")]
    run = CliRunner().invoke(build_app(), ["bench", "--help"], env={"COLUMNS": "200"})
    assert run.exit_code == 0 and len(examples) >= 2
    shown = joined_examples([line.strip().strip("│").strip() for line in run.stdout.splitlines()])
    assert all(example in shown for example in examples)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "crate_mae_huge"], "unknown model"),
        (["--precision", "fp8"], "--precision fp8"),
        (["--img-size", "40"], "not a multiple"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--device", "tpu"], "--device tpu"),
    ],
)
def test_bench_bad_input(args, message):
    run = _invoke(*args)
    assert run.exit_code == 2, run.output
    assert message in run.output
    assert len(run.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_cuda_without_a_gpu_is_bad_input():
    run = _invoke("--device", "cuda")
    assert run.exit_code == 2
    assert "no CUDA GPU" in run.output


@pytest.mark.slow
def test_compiled_fast_path_passes_the_check():
    """What `--compile` times is checked like the eager path (about a minute to compile)."""
    model = _model(CONFIGS[0])
    fns = loss_functions(model, compile=True)
    checks = check_paths(model, fns, ["fast"], torch.randn(4, 3, 32, 32),
                         Precision("fp32", "cpu", ""))
    assert checks[0].ok and checks[0].grad_rel_err < 1e-4


def test_bench_records_its_training_rate_for_bench_data_and_the_dry_run(monkeypatch, tmp_path):
    """The fast path's median images/s is recorded under the model's key on this device
    (`model_key`), where bench-data and the dry run look for it (`recorded_rate`)."""
    from cratemae.bench import speed
    from cratemae.bench.data import model_key, recorded_rate

    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path))  # the other bench tests record too
    result = {"spec": {}, "paths": {"fast": {"images_per_s": 123.5}}}
    monkeypatch.setattr(speed, "run_bench", lambda spec: result)  # the wiring, not the timing
    assert recorded_rate(model_key("crate_mae_tiny", 32, "cpu")) is None
    run = _invoke("--json")
    assert run.exit_code == 0, run.output
    assert recorded_rate(model_key("crate_mae_tiny", 32, "cpu")) == 123.5
    assert recorded_rate(model_key("crate_mae_tiny", 64, "cpu")) is None  # its own key
