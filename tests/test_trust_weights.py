"""Non-finite numbers never pass as results, and weights files are checked before anything
is built from them: a pre-training run whose every step was skipped or whose weights went
NaN stops with exit 1 (its newest checkpoint the last finite one, a stop signal included);
every loader refuses NaN/inf weights naming the tensor, and a configuration that the
tensors in the file's header do not bear out, before a model is built; no FIFO is opened
where a file is expected; what a run says when it is over."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from support import DEMO_RECIPE, TINY, cli, tiny_recipe

from cratemae.checkpoints import load_checkpoint, write_model_weights
from cratemae.checkpoints.files import FORMAT
from cratemae.checkpoints.load import read_model_header
from cratemae.checkpoints.resolve import resolve_checkpoint
from cratemae.checkpoints.state_dict import check_finite, first_nonfinite
from cratemae.commands.pretrain import _the_end
from cratemae.errors import BadInputError, CrateMAEError
from cratemae.model import CrateMAE, CrateMAEConfig
from cratemae.recipe import load_recipe
from cratemae.recipe.schema import RunSection
from cratemae.tasks.pretrain import MAETask, pretrain
from cratemae.train.recovery import NanGuard, checkpoint_words
from cratemae.train.state import TrainState
from cratemae.train.trainer import Preempted, RunResult
from cratemae.weights import authors_file
from cratemae.weights import load as weights_load
from cratemae.weights.authors_file import AuthorsWeights, build_authors_model
from cratemae.weights.load import load_encoder, load_model

RUN = ["schedule.warmup_epochs=0.05", "run.log_every=1", "run.checkpoint_every_steps=2",
       "run.loggers=[]", "data.num_workers=0", "run.nan_patience=50"]
SMALL = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def newest(run_dir: Path) -> Path:
    return resolve_checkpoint(run_dir)


def all_finite(path: Path) -> bool:
    return first_nonfinite(load_checkpoint(path).model_state) is None


def loss_hook(monkeypatch, *, nan_loss=lambda m: False, nan_weights_at=None, signal_at=None):
    """The task's loss, NaN at the micro-batches `nan_loss` picks; at `nan_weights_at` a
    weight becomes NaN (its loss stays finite: an update that overflowed); at `signal_at`
    the process gets SIGTERM, as SLURM's preemption sends it."""
    real = MAETask.loss

    def loss(self, model, batch, micro):
        out = real(self, model, batch, micro)
        if micro == nan_weights_at:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        if micro == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out * float("nan") if nan_loss(micro) else out

    monkeypatch.setattr(MAETask, "loss", loss)


# --- 1. pre-training never ends "finished" on non-finite numbers -------------------------
def test_a_run_whose_every_step_is_skipped_exits_1_keeping_the_last_finite_checkpoint(
        tmp_path, monkeypatch):
    pretrain(tiny_recipe(*RUN, "schedule.max_steps=2"), run_dir=tmp_path)
    assert ckpts(tmp_path) == ["step-000000002"]
    loss_hook(monkeypatch, nan_loss=lambda m: True)
    run = cli("pretrain", DEMO_RECIPE, *[f"--set={s}" for s in [*TINY, *RUN]],
              "--set=schedule.max_steps=4", "--out", tmp_path)
    assert run.exit_code == 1, run.output
    [error] = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "every one of the 2 step(s) this run took was skipped" in error
    assert str(tmp_path / "checkpoints" / "step-000000002") in error
    assert "finished" not in run.stdout
    assert ckpts(tmp_path) == ["step-000000002"]  # nothing saved over it
    assert newest(tmp_path).name == "step-000000002" and all_finite(newest(tmp_path))


def test_weights_that_end_non_finite_exit_1_and_are_not_saved(tmp_path, monkeypatch):
    loss_hook(monkeypatch, nan_weights_at=2)  # step 3 of 3: finite loss, NaN weights
    with pytest.raises(CrateMAEError, match="weights after step 3 are not finite") as err:
        pretrain(tiny_recipe(*RUN, "schedule.max_steps=3"), run_dir=tmp_path)
    assert err.value.exit_code == 1
    assert "last finite checkpoint: " in str(err.value)
    assert ckpts(tmp_path) == ["step-000000002"] and all_finite(newest(tmp_path))


def test_a_stop_signal_never_saves_non_finite_weights(tmp_path, monkeypatch):
    loss_hook(monkeypatch, nan_weights_at=2, signal_at=2)
    with pytest.raises(Preempted, match=r"not finite .*not saved") as err:
        pretrain(tiny_recipe(*RUN, "schedule.max_steps=6"), run_dir=tmp_path)
    assert err.value.exit_code == 3  # requeue: the next run resumes from step 2
    assert ckpts(tmp_path) == ["step-000000002"] and all_finite(newest(tmp_path))


# --- 2. every loader refuses NaN/inf weights ------------------------------------------------
def tiny_weights(path: Path, config: dict | None = None, **change: float) -> Path:
    """A weights file of a tiny CrateMAE (as `cratemae export` writes one); `change` sets
    a tensor (by key) to one value."""
    torch.manual_seed(0)
    model = CrateMAE(CrateMAEConfig(**SMALL))
    state = model.state_dict()
    for key, value in change.items():
        key = key.replace("__", ".")
        state[key] = torch.full_like(state[key], float(value))
    return write_model_weights(path, state, config or model.config.to_dict())


NAN_KEY = "encoder.blocks.0.ista.dictionary"


def test_every_loader_refuses_nan_weights_naming_the_tensor(tmp_path):
    bad = tiny_weights(tmp_path / "nan.safetensors", **{NAN_KEY.replace(".", "__"): "nan"})
    for load in (load_model, load_encoder):
        with pytest.raises(BadInputError, match=f"NaN or inf .*'{NAN_KEY}'"):
            load(bad)
    run = cli("export", bad, "--out", tmp_path / "out")
    assert run.exit_code == 2 and not (tmp_path / "out").exists()
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bad}: its weights hold NaN or inf (1024 value(s) of tensor '{NAN_KEY}', "
        "the first such tensor): the run diverged before this was saved; use an earlier "
        "checkpoint"]
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    run = cli("reconstruct", tmp_path / "img.png", "--checkpoint", bad,
              "--out", tmp_path / "rec.png")
    assert run.exit_code == 2 and NAN_KEY in run.stderr


def test_inf_in_bf16_is_refused_and_minus_zero_and_subnormals_pass():
    check_finite({"a": torch.tensor([-0.0, 1e-45, 5e-324], dtype=torch.float64),
                  "b": torch.tensor([-0.0, 1e-40]), "steps": torch.tensor([7])}, "x")
    with pytest.raises(BadInputError, match=r"1 value.*'w'"):
        check_finite({"w": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)}, "x")
    found = first_nonfinite({"state": {0: {"exp_avg": torch.tensor([float("-inf")])}}})
    assert found == ("state.0.exp_avg", 1)


def test_a_nan_average_is_left_to_resume_and_loaders_load_the_finite_model(tmp_path):
    """Decided: commands load the trained weights, never the average under `ema.`, so a NaN
    there does not stop them; resuming (which carries the average on) refuses it."""
    model = CrateMAE(CrateMAEConfig(**SMALL))
    state = {**model.state_dict(), "ema.encoder.cls_token": torch.full((1, 1, 32), torch.inf)}
    file = write_model_weights(tmp_path / "w.safetensors", state, model.config.to_dict())
    assert load_model(file).config.embed_dim == 32


# --- 3. the configuration is checked against the header before anything is built -------
def bomb(path: Path, blocks: int = 1, **config) -> Path:
    """A 1 KB weights file whose stored configuration asks for width 65,536, depth 64
    (`blocks`: how many of the 64 blocks it holds a tiny tensor of)."""
    from safetensors.torch import save_file

    wanted = {**SMALL, "embed_dim": 65536, "decoder_embed_dim": 65536, "depth": 64,
              "decoder_depth": 64, "num_heads": 16, "decoder_num_heads": 16,
              "img_size": 224, **config}
    tensors = {f"encoder.blocks.{i}.norm1.weight": torch.zeros(4, dtype=torch.float16)
               for i in range(blocks)}
    save_file({"encoder.cls_token": torch.zeros(1, 1, 4, dtype=torch.float16), **tensors},
              str(path), metadata={"format": FORMAT, "kind": "model",
                                   "config": json.dumps(wanted)})
    assert path.stat().st_size < 1024 * blocks
    return path


@pytest.fixture
def no_real_model(monkeypatch):
    """Fails the test if a model is built anywhere but on the `meta` device."""
    built: list[str] = []

    def spy(build):
        def wrapped(*args, **kwargs):
            built.append(torch.empty(0).device.type)
            assert built[-1] == "meta", "a model was built for real from an unchecked file"
            return build(*args, **kwargs)
        return wrapped

    for module, name in ((weights_load, "build_model"), (weights_load, "build_encoder"),
                         (authors_file, "CrateMAE")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    return built


@pytest.mark.parametrize("change", [{}, {"img_size": 32}, {"patch_size": 2, "img_size": 512},
                                    {"blocks": 64}])  # the depth borne out, not the width
def test_a_config_bomb_is_refused_by_every_loader_before_any_model(tmp_path, no_real_model,
                                                                    change):
    file = bomb(tmp_path / "bomb.safetensors", **change)
    for load in (load_model, load_encoder):
        with pytest.raises(BadInputError, match=str(file)):
            load(file)
    # import-authors: what the file records overrides the shapes, so it is the same bomb
    weights = authors_file.read_authors_file(file)
    with pytest.raises(BadInputError, match=str(file)):
        build_authors_model(weights, file, preset="crate_mae_tiny", overrides={})
    run = cli("export", file, "--out", tmp_path / "out")
    assert run.exit_code == 2 and run.stderr.count("error:") == 1, run.output


def test_the_header_is_read_without_the_tensors(tmp_path):
    file = tiny_weights(tmp_path / "w.safetensors")
    stand_ins, config = read_model_header(file)
    assert config["embed_dim"] == 32
    assert stand_ins[NAN_KEY].is_meta and stand_ins[NAN_KEY].shape == (32, 32)


def test_a_depth_the_blocks_do_not_bear_out_is_refused(tmp_path, no_real_model):
    file = tiny_weights(tmp_path / "w.safetensors", config={**SMALL, "depth": 2})
    with pytest.raises(BadInputError, match="depth = 2, its weights hold 1"):
        load_model(file)


def test_a_head_count_changes_no_shape_and_loads(tmp_path):
    heads = tiny_weights(tmp_path / "h.safetensors", config={**SMALL, "num_heads": 4})
    assert load_model(heads).config.num_heads == 4  # heads change no shape: it loads


def test_metadata_that_is_not_json_is_one_error(tmp_path):
    from safetensors.torch import save_file

    for text in ("{not json", "[" * 100_000, "[1, 2]"):
        save_file({"a": torch.zeros(1)}, str(tmp_path / "w.safetensors"),
                  metadata={"format": FORMAT, "config": text})
        run = cli("export", tmp_path / "w.safetensors", "--out", tmp_path / "out")
        assert run.exit_code == 2 and run.stderr.startswith("error:"), run.output
        assert "metadata 'config' is not" in run.stderr


def test_authors_weights_with_nan_are_refused(tmp_path, no_real_model):
    model = CrateMAE(CrateMAEConfig(**SMALL))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.norm.weight"][0] = float("nan")
    weights = AuthorsWeights(state, dict(SMALL))
    with pytest.raises(BadInputError, match=r"'encoder\.norm\.weight'"):
        build_authors_model(weights, tmp_path / "x.pth", preset="crate_mae_tiny",
                            overrides={})


# --- 4. no FIFO is opened where a file is expected ------------------------------------------
def returns_within_a_second(call) -> BaseException | None:
    """`call()` in a thread; fails the test if it is still running after a second (it
    would be waiting on the FIFO for ever). Returns what it raised."""
    raised: list[BaseException | None] = [None]

    def run():
        try:
            call()
        except BaseException as err:  # returned to the test
            raised[0] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=1)
    assert not thread.is_alive(), "waited on a FIFO"
    return raised[0]


def tiny_checkpoint(run_dir: Path) -> Path:
    """A complete checkpoint of a tiny model, as the store writes one."""
    from cratemae.checkpoints import collect_rng_state, save_checkpoint

    model = CrateMAE(CrateMAEConfig(**SMALL))
    (run_dir / "recipe.toml").parent.mkdir(parents=True)
    (run_dir / "recipe.toml").write_text("")
    meta = {"epoch": 0, "samples_seen": 0, "data_position": {"epoch": 0, "batch": 2},
            "recipe_hash": "x", "recipe_toml": "", "end_of_epoch": False}
    return save_checkpoint(run_dir, step=2, model_state=model.state_dict(),
                           model_config=model.config.to_dict(), optimizer_state={},
                           scaler_state={}, rng_states=[collect_rng_state()], meta=meta)


@pytest.mark.parametrize("name", ["latest", "meta.json", "model.safetensors",
                                  "train_state.safetensors"])
def test_a_fifo_where_a_checkpoint_file_belongs_is_refused_at_once(tmp_path, name):
    run = tmp_path / "run"
    ckpt = tiny_checkpoint(run)
    target = ckpt.parent / name if name == "latest" else ckpt / name
    target.unlink()
    os.mkfifo(target)
    calls = [lambda: load_model(run), lambda: load_model(target),
             lambda: read_model_header(target), lambda: load_checkpoint(run)]
    if name != "latest":  # the checkpoint itself: resume reads all of it, loaders two files
        calls.append(lambda: load_checkpoint(ckpt))
    if name in ("meta.json", "model.safetensors"):
        calls.append(lambda: load_encoder(ckpt))
    errors = [returns_within_a_second(call) for call in calls]
    assert all(isinstance(err, BadInputError) for err in errors), errors
    if name != "model.safetensors":  # (that one reads as missing: never opened either)
        assert "is a FIFO, not a regular file; refused" in str(errors[-1])


def test_a_fifo_given_to_import_authors_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "w.safetensors")
    err = returns_within_a_second(
        lambda: authors_file.read_authors_file(tmp_path / "w.safetensors"))
    assert isinstance(err, BadInputError) and "FIFO" in str(err)


# --- 5. what a run says when it is over -----------------------------------------------------
def result(**state) -> RunResult:
    return RunResult(Path("runs/x"), Path("runs/x/checkpoints/step-000000008"), 0.41,
                     TrainState(step=8, **state), total_steps=8)


def test_the_closing_summary_says_the_run_rolled_back():
    assert result(recoveries=2, lr_factor=0.25).recovery_note == "rolled back 2x, lr x0.25"
    assert result(recoveries=1, lr_factor=0.5, fp32=True).recovery_note == (
        "rolled back 1x, lr x0.5, float32")
    assert result().recovery_note == ""
    head = _the_end(result(recoveries=2, lr_factor=0.25), "demo:train").splitlines()[0]
    assert head == ("finished: step 8 of 8, loss 0.4100 (rolled back 2x, lr x0.25 after "
                    "non-finite losses)")
    assert "rolled back" not in _the_end(result(), "demo:train")


def test_a_rollback_names_the_checkpoint_loss_and_says_when_it_was_far_from_the_best(
        tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-000000004"
    guard = NanGuard(RunSection(nan_patience=1))
    guard.tripped(False)
    plan = guard.decide(TrainState(step=6), ckpt, loss=0.52, best=0.5)
    assert plan.warning(4, 3, tmp_path) == (
        "1 non-finite losses in a row at step 6; rolled back to step 4 "
        "(checkpoints/step-000000004, loss 0.52), lr x0.5, recovery 1 of 3")
    guard.tripped(False)
    far = guard.decide(TrainState(step=6), ckpt, loss=2.3, best=0.5)
    assert "(checkpoints/step-000000004, loss 2.3, already far above the run's best 0.5)" \
        in far.warning(4, 3, tmp_path)
    assert checkpoint_words(ckpt, 2.3, 0.5) == (
        f"last checkpoint: {ckpt} (loss 2.3, already far above the run's best 0.5)")
    assert checkpoint_words(ckpt, 0.52, 0.5) == f"last good checkpoint: {ckpt} (loss 0.52)"
    stop = NanGuard(RunSection(nan_patience=1, nan_recovery="stop"))
    stop.tripped(False)
    with pytest.raises(CrateMAEError, match=r"; last checkpoint: .*already far above"):
        stop.decide(TrainState(step=6), ckpt, loss=2.3, best=0.5)


def test_skipped_steps_warn_once_a_window_with_the_count():
    guard = NanGuard(RunSection(nan_patience=8, nan_window=10))
    said = []
    for step in range(1, 26):
        guard.tripped(step % 4 != 0, step)  # steps 4, 8, ... skipped
        said.append(guard.report(step))
    said.append(guard.report(25, final=True))
    assert [s for s in said if s] == [
        "non-finite loss: 2 steps skipped between steps 4 and 8",
        "non-finite loss: 3 steps skipped between steps 12 and 20",
        "non-finite loss: 1 step skipped at step 24"]


@pytest.mark.slow  # quick counterpart: test_skipped_steps_warn_once_a_window_with_the_count
def test_many_skipped_steps_log_one_line_per_window_not_per_step(tmp_path, monkeypatch,
                                                                 caplog):
    caplog.set_level("WARNING", logger="cratemae")
    loss_hook(monkeypatch, nan_loss=lambda m: m in (1, 2, 3, 5, 6))  # steps 2-4, 6-7
    pretrain(tiny_recipe(*RUN, "schedule.max_steps=8", "run.nan_window=4",
                         "run.nan_patience=4", "run.checkpoint_every_steps=100"),
             run_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines == ["non-finite loss: 3 steps skipped between steps 2 and 4",
                     "non-finite loss: 2 steps skipped between steps 6 and 7"]


# --- 6. the "next:" lines run where the user is ----------------------------------------------
@pytest.mark.parametrize(("train", "probe"), [
    ("demo:train", "cratemae probe probe/demo --checkpoint runs/x"),
    ("/data/imagenet/train-{000000..001023}.tar", "cratemae probe probe/in1k --checkpoint"),
    ("/data/flowers/train", "probe/demo --checkpoint runs/x --set data.train="),
])
def test_the_next_lines_name_shipped_recipes_that_fit_the_data(train, probe):
    text = _the_end(result(), train)
    assert probe in text and "recipes/" not in text
    assert ("recipes copy probe/demo" in text) == (train == "/data/flowers/train")
    for name in ("probe/demo", "probe/in1k"):
        assert load_recipe(name).data.train is not None  # runnable by name from anywhere


def test_the_diverged_chain_stops_at_pretrain(tmp_path, monkeypatch):
    """pretrain that diverged -> embed -> probe: its first step exits non-zero."""
    loss_hook(monkeypatch, nan_loss=lambda m: True)
    with pytest.raises(CrateMAEError) as err:
        pretrain(tiny_recipe(*RUN, "schedule.max_steps=2"), run_dir=tmp_path)
    assert err.value.exit_code == 1
    assert not (tmp_path / "checkpoints").exists() or ckpts(tmp_path) == []
