"""Checkpoint store: exact round trips, atomicity under SIGKILL, retention, clear errors."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import REPO

import cratemae.checkpoints as ck
from cratemae.checkpoints.resolve import resolve_checkpoint
from cratemae.errors import BadInputError

BASE_META = {"samples_seen": 128, "recipe_hash": "deadbeef", "recipe_toml": "[run]\nseed = 1\n"}


def _meta(epoch: int = 0, end_of_epoch: bool = False, **extra: Any) -> dict[str, Any]:
    meta = {**BASE_META, "epoch": epoch, "data_position": {"epoch": epoch, "batch": 7}}
    return {**meta, "end_of_epoch": end_of_epoch, **extra}


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _trained(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _save(run_dir: Path, step: int, model=None, opt=None, rng=None, meta=None, **kw: Any) -> Path:
    """A checkpoint of a tiny model; `meta` replaces the default meta, `kw` adjusts it."""
    model = model if model is not None else _tiny()
    return ck.save_checkpoint(
        run_dir,
        step=step,
        model_state=model.state_dict(),
        model_config={"name": "tiny", "dims": [4, 8, 2]},
        optimizer_state=opt.state_dict() if opt is not None else {"state": {}, "param_groups": []},
        scaler_state={"scale": 65536.0, "_growth_tracker": 3},
        rng_states=rng if rng is not None else [ck.collect_rng_state()],
        meta=meta if meta is not None else _meta(**kw),
    )


def _sorted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(sorted(state.items()))  # safetensors sorts by name; state-dict order is moot


def assert_same(a: Any, b: Any, path: str = "root") -> None:
    """Exact equality: same types (tuple vs list, int vs float), same dtypes, same bits."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        bits = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*bits), f"{path}: tensor bits differ"
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{path}: keys"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_optimizer_round_trip_and_identical_next_step(tmp_path: Path) -> None:
    model, opt = _trained()
    path = _save(tmp_path, 3, model, opt, epoch=1)
    ckpt = ck.load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.path == path and not ckpt.weights_only
    assert_same(ckpt.optimizer_state, opt.state_dict())
    assert_same(ckpt.model_state, _sorted(model.state_dict()))
    assert ckpt.model_config == {"name": "tiny", "dims": [4, 8, 2]}
    assert_same(ckpt.scaler_state, {"scale": 65536.0, "_growth_tracker": 3})
    assert ckpt.meta["data_position"] == {"epoch": 1, "batch": 7}
    assert ckpt.meta["world_size"] == 1 and ckpt.meta["recipe_hash"] == "deadbeef"

    clone = _tiny()
    clone.load_state_dict(ck.check_state_dict_matches(clone, ckpt.model_state, str(path)))
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=0.5)  # wrong lr: the state must win
    clone_opt.load_state_dict(ckpt.optimizer_state)
    batch = torch.randn(5, 4)
    for m, o in ((model, opt), (clone, clone_opt)):
        o.zero_grad()
        m(batch).pow(2).mean().backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_flatten_unflatten_awkward_tree_through_safetensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    int8, boolean = torch.tensor([-3, 4], dtype=torch.int8), torch.tensor([True, False])
    tree = {
        0: {"step": torch.tensor(3.0), "buf": base.T, "view": base[1]},  # non-contiguous, view
        -7: ("a", ("nested", (1, 2.5)), []),
        "floats": [0.1, -0.0, 1e308, 5e-324, math.nan, math.inf, -math.inf, 2.0],
        "ints": [0, 2**70, -(2**63), True, False, None],
        "keys": {1.5: "float key", True: "bool key", None: "none key", "": "empty"},
        "empty": ({}, [], (), ""),
        "dtypes": [torch.randn(3, dtype=torch.bfloat16), torch.randn(2, 2).half(), int8, boolean],
        "odd": [torch.zeros(0, 5), torch.randn(2, requires_grad=True)],
        "unicode ✓": "résumé",
    }
    tensors, skeleton = ck.flatten_tree(tree, prefix="t.")
    assert all(k.startswith("t.") for k in tensors)
    file = str(tmp_path / "x.safetensors")
    save_file(tensors, file)
    back = ck.unflatten_tree(load_file(file), json.loads(json.dumps(skeleton)))
    assert_same(back, {**tree, "odd": [t.detach() for t in tree["odd"]]})
    assert isinstance(back[-7][1], tuple) and isinstance(back["empty"][2], tuple)
    # What cannot be stored is refused, naming where it sits.
    with pytest.raises(TypeError, match=r"<root>\.opt\.lr: cannot store a value of type ndarray"):
        ck.flatten_tree({"opt": {"lr": np.zeros(2)}})
    with pytest.raises(TypeError, match="dict key"):
        ck.flatten_tree({(1, 2): 3})
    with pytest.raises(ValueError, match="not in the file"):
        ck.unflatten_tree({}, {"tensor": "missing"})


def _draws() -> list:
    numpy_draws = [np.random.rand(3).tolist(), np.random.randn(3).tolist()]
    python_draws = [random.random(), random.gauss(0, 1), random.getrandbits(64)]
    return [torch.rand(4), torch.randn(3), *numpy_draws, *python_draws]


def test_rng_restore_reproduces_next_numbers(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leaves python's cached second gaussian set: it must round-trip too
    np.random.randn(1)  # same for numpy's cached gaussian
    state = ck.collect_rng_state()
    first = _draws()
    # Put the state through a real two-rank checkpoint and through a pack/unpack round trip.
    _save(tmp_path, 2, rng=[ck.collect_rng_state(), state])
    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.meta["world_size"] == 2 and len(loaded.rng_states) == 2
    for restored in (loaded.rng_states[1], ck.unpack_rng_state(ck.pack_rng_state(state))):
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        ck.restore_rng_state(restored)
        again = _draws()
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    # And the rank-0 state (taken after `first` was drawn) continues from there, not from `state`.
    ck.restore_rng_state(loaded.rng_states[0])
    assert not torch.equal(torch.rand(4), first[0])


def test_latest_points_at_newest_and_find_resume(tmp_path: Path) -> None:
    assert ck.find_resume(tmp_path, ck.Resume.parse("auto")) is None
    paths = [_save(tmp_path, s) for s in (10, 20, 30)]
    latest = tmp_path / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step-000000030"
    assert ck.load_checkpoint(tmp_path).step == 30
    assert ck.find_resume(tmp_path, ck.Resume.parse("auto")) == paths[2]
    with pytest.raises(BadInputError, match="--resume never would mix"):
        # a fresh run into a directory with checkpoints
        ck.find_resume(tmp_path, ck.Resume.parse("never"))
    assert ck.find_resume(tmp_path, ck.Resume.parse(str(paths[0]))) == paths[0]
    # The pointer file named as a checkpoint is followed, never read as a weights file.
    assert resolve_checkpoint(latest) == paths[2]
    with pytest.raises(BadInputError, match="no such checkpoint"):
        ck.find_resume(tmp_path, ck.Resume.parse(str(tmp_path / "nope")))
    (paths[1] / "meta.json").unlink()
    with pytest.raises(BadInputError, match=r"step-000000020/meta\.json: missing"):
        ck.find_resume(tmp_path, ck.Resume.parse(str(paths[1])))
    # A stale pointer (edited by hand) falls back to the newest complete checkpoint.
    latest.write_text("step-000000020\n")
    assert ck.find_resume(tmp_path, ck.Resume.parse("auto")) == paths[2]
    latest.unlink()
    assert ck.load_checkpoint(tmp_path / "checkpoints").step == 30


def test_a_run_whose_checkpoints_are_all_damaged_is_not_started_over(tmp_path: Path) -> None:
    """--resume auto (or never) found no complete checkpoint and started from step 0 in the
    same directory, replacing the run's metrics and `latest`. It is refused, with the reason
    of the newest; one good checkpoint left, or a path given, resumes as before."""
    paths = [_save(tmp_path, s) for s in (10, 20)]
    for p in paths:
        (p / "meta.json").unlink()
    for mode in ("auto", "never"):
        with pytest.raises(BadInputError, match=r"holds 2 checkpoint\(s\), none complete \(.*"
                           r"step-000000020/meta\.json: missing .*\); starting over would "):
            ck.find_resume(tmp_path, ck.Resume.parse(mode))
    good = _save(tmp_path, 30)
    assert ck.find_resume(tmp_path, ck.Resume.parse("auto")) == good
    assert ck.find_resume(tmp_path / "other", ck.Resume.parse(str(good))) == good


def test_resave_same_step_replaces_and_removes_debris(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    _save(tmp_path, 5)
    (ckpt_dir / ".step-000000006.tmp-999999").mkdir()
    (ckpt_dir / ".step-000000006.tmp-999999" / "model.safetensors").write_bytes(b"half")
    (ckpt_dir / ".latest.tmp-999999").write_text("junk")
    model = _tiny().requires_grad_(False)
    model[0].weight.fill_(7.0)
    _save(tmp_path, 5, model)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step-000000005"]
    assert torch.all(ck.load_checkpoint(tmp_path).model_state["0.weight"] == 7.0)


def _epoch_run(run_dir: Path, steps: int = 8) -> None:
    # Two steps per epoch: step 2 ends epoch 0, step 4 ends epoch 1, ...
    for step in range(1, steps + 1):
        _save(run_dir, step, epoch=(step - 1) // 2, end_of_epoch=step % 2 == 0)


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_prune_keep_last_and_every_epochs(tmp_path: Path) -> None:
    _epoch_run(tmp_path)
    (tmp_path / "checkpoints" / "step-000000009").mkdir()  # incomplete: left alone
    removed = ck.prune_checkpoints(tmp_path / "checkpoints", keep_last=2, keep_every_epochs=2)
    assert _steps(tmp_path) == [4, 7, 8, 9]  # epochs 1, 3 (end at 4, 8): (epoch + 1) % 2 == 0
    assert sorted(int(p.name[5:]) for p in removed) == [1, 2, 3, 5, 6]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_prune_without_epochs_and_custom_epoch_of(tmp_path: Path) -> None:
    _epoch_run(tmp_path)
    ck.prune_checkpoints(tmp_path, keep_last=3, keep_every_epochs=None)  # run dir works too
    assert _steps(tmp_path) == [6, 7, 8]
    ck.prune_checkpoints(tmp_path, keep_last=1, keep_every_epochs=1, epoch_of=lambda m: m["epoch"])
    assert _steps(tmp_path) == [6, 7, 8]  # every epoch kept by the custom rule
    ck.prune_checkpoints(tmp_path, keep_last=1, keep_every_epochs=3)
    assert _steps(tmp_path) == [6, 8]  # step 6 ends epoch 2
    # Never the one `latest` names, even with nothing else kept.
    (tmp_path / "checkpoints" / "latest").write_text("step-000000006\n")
    ck.prune_checkpoints(tmp_path / "checkpoints", keep_last=0)
    assert _steps(tmp_path) == [6] and ck.load_checkpoint(tmp_path).step == 6


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "target", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "model.safetensors", "truncated"),
        (_flip_byte, "train_state.safetensors", "SHA-256 mismatch"),
        (_flip_byte, "model.safetensors", "SHA-256 mismatch"),
        (lambda p: p.unlink(), "meta.json", "missing"),
        (lambda p: p.write_text("{not json"), "meta.json", "not valid JSON"),
        (lambda p: p.unlink(), "train_state.safetensors", "missing"),
    ],
)
def test_damaged_file_is_named(tmp_path: Path, damage, target: str, message: str) -> None:
    path = _save(tmp_path, 1)
    damage(path / target)
    with pytest.raises(BadInputError) as info:
        ck.load_checkpoint(path)
    text = str(info.value)
    assert str(path / target) in text and message in text and "\n" not in text
    assert info.value.exit_code == 2


def test_wrong_file_types(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(BadInputError, match=r"model\.safetensors: not a valid safetensors file"):
        ck.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(BadInputError, match=r"foreign\.safetensors: not a cratemae file"):
        ck.read_model_weights(foreign)
    with pytest.raises(BadInputError, match=r"train_state\.safetensors: metadata is missing"):
        ck.load_checkpoint(path / "train_state.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match=r"empty: not a checkpoint, a run directory"):
        ck.load_checkpoint(tmp_path / "empty")


def test_weights_only_loading(tmp_path: Path) -> None:
    model, opt = _trained()
    path = _save(tmp_path, 3, model, opt)
    for source in (tmp_path, path, path / "model.safetensors"):
        weights, config = ck.read_model_weights(source)
        assert_same(weights, _sorted(model.state_dict()))
        assert config["dims"] == [4, 8, 2]
    ckpt = ck.load_checkpoint(path / "model.safetensors")
    assert ckpt.weights_only and ckpt.rng_states is None and ckpt.meta["step"] == 3
    exported = ck.write_model_weights(
        tmp_path / "out" / "m.safetensors", model.state_dict(), {"a": 1}
    )
    ckpt = ck.load_checkpoint(exported)
    assert ckpt.meta == {} and ckpt.model_config == {"a": 1}
    assert_same(ckpt.model_state, _sorted(model.state_dict()))


def test_save_rejects_bad_arguments_and_writes_nothing(tmp_path: Path) -> None:
    bad = [
        ({"epoch": 0}, "missing samples_seen"),
        ({**_meta(), "step": 3}, r"may not set step \(to 3; the step argument is 1\)"),
        ({**_meta(), "files": {}}, "may not set files"),
        ({**_meta(), "when": object()}, "not JSON-serialisable"),
        (_meta(end_of_epoch=1), "must be a bool"),
    ]
    for meta, message in bad:
        with pytest.raises(ValueError, match=message):
            _save(tmp_path, 1, meta=meta)
    assert not (tmp_path / "checkpoints").exists() or not _steps(tmp_path)
    assert ck.load_checkpoint(_save(tmp_path, 1, meta={**_meta(), "step": 1})).step == 1


def test_strip_wrapper_prefixes() -> None:
    t = torch.zeros(1)
    state = {"module._orig_mod.a.w": t, "_orig_mod.module.b": t, "enc._orig_mod.blk.0.w": t, "c": t}
    assert list(ck.strip_wrapper_prefixes(state)) == ["a.w", "b", "enc.blk.0.w", "c"]
    inner = {"sub.module.x": t}  # `module` inside a name is a real submodule: kept
    assert list(ck.strip_wrapper_prefixes(inner)) == ["sub.module.x"]
    with pytest.raises(BadInputError, match="wrapped and unwrapped copies of 'c'"):
        ck.strip_wrapper_prefixes({"module.c": t, "c": t})


def test_check_state_dict_matches_messages() -> None:
    model = _tiny()
    good = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    assert list(ck.check_state_dict_matches(model, good, "ck")) == list(model.state_dict())
    bad = {k: v for k, v in model.state_dict().items() if k != "2.bias"}
    bad.update({"extra.w": torch.zeros(1), "0.weight": torch.zeros(2, 4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BadInputError) as info:
        ck.check_state_dict_matches(model, bad, "run/ckpt/model.safetensors")
    assert str(info.value) == (
        "run/ckpt/model.safetensors: does not match the model: 1 missing key: 2.bias; "
        "1 unexpected key: extra.w; 1 shape mismatch: 0.weight (checkpoint [2, 4], model [8, 4])"
    )
    assert_same(dict(model.state_dict()), before)  # checked, not half-loaded
    many = {f"x{i}": torch.zeros(1) for i in range(8)}
    first_five = r"8 unexpected keys: x0, x1, x2, x3, x4, \.\.\. \(3 more\)"
    with pytest.raises(BadInputError, match=first_five):
        ck.check_state_dict_matches(model, {**model.state_dict(), **many}, "src")


_WRITER = r"""
import sys, torch
from cratemae.checkpoints import collect_rng_state as rng, prune_checkpoints, save_checkpoint
run_dir, step = sys.argv[1], int(sys.argv[2])
while True:
    value = float(step)
    meta = {"epoch": 0, "samples_seen": step, "data_position": {"batch": step},
            "recipe_hash": "h", "recipe_toml": "", "end_of_epoch": False}
    opt = {"state": {0: {"exp_avg": torch.full((10**6,), value)}},
           "param_groups": [{"lr": value, "params": [0]}]}
    weights = {"big": torch.full((4 * 10**6,), value), "small": torch.full((3,), value)}
    save_checkpoint(run_dir, step=step, model_state=weights, model_config={"step": step},
                    optimizer_state=opt, scaler_state={}, rng_states=[rng()], meta=meta)
    prune_checkpoints(run_dir, keep_last=2)
    print(step, flush=True)
    step += 1
"""


def _assert_consistent(run_dir: Path) -> int:
    # `latest` itself must name a complete checkpoint (not just "some checkpoint loads").
    named = (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt = ck.load_checkpoint(run_dir / "checkpoints" / named)
    assert ck.load_checkpoint(run_dir).path == ckpt.path
    step = ckpt.step
    assert ckpt.model_config == {"step": step} and ckpt.meta["samples_seen"] == step
    assert all(torch.all(t == step) for t in ckpt.model_state.values())
    assert torch.all(ckpt.optimizer_state["state"][0]["exp_avg"] == step)
    assert ckpt.optimizer_state["param_groups"][0]["lr"] == float(step)
    return step


# quick twins: tests/test_fs.py (an interrupted write keeps the old file) and the re-save
# test above (debris of a dead writer is removed)
@pytest.mark.slow
def test_sigkill_during_writes_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    # Fixed kill moments (0 to 0.4 s after a round's first save), so a failure reproduces.
    rng = random.Random(20261204)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start, done = 1, []
    for _ in range(3):
        cmd = [sys.executable, "-c", _WRITER, str(tmp_path), str(start)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        try:
            first = int(proc.stdout.readline())  # one checkpoint of this round is complete
            assert first == start
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        step = _assert_consistent(tmp_path)
        assert step >= start and step not in done
        done.append(step)
        start = step + 1000  # the next round's steps are distinct from anything written
    # The next ordinary save clears whatever the kills left half-written.
    _save(tmp_path, start)
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
