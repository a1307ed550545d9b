"""Recipe values that would make a run meaningless are refused in one line naming the key:
non-finite numbers, values of another type (no coercion from strings or between booleans and
numbers), a zero std, an empty output directory, a mask that hides every patch, and a
`--set` value that is not TOML (a string needs its quotes)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe

DEMO = REPO / "recipes" / "demo.toml"


@pytest.mark.parametrize(("setting", "key"), [
    ("optim.lr=inf", "optim.lr"),
    ("optim.base_lr=nan", "optim.base_lr"),
    ("optim.min_lr=-inf", "optim.min_lr"),
    ("model.ista_step_size=nan", "model.ista_step_size"),
    ("schedule.warmup_epochs=inf", "schedule.warmup_epochs"),
    ("data.batch_size=true", "data.batch_size"),
    ("data.batch_size=8.0", "data.batch_size"),
    ('data.batch_size="8"', "data.batch_size"),
    ("run.compile=1", "run.compile"),
    ('optim.weight_decay="0.05"', "optim.weight_decay"),
    ("data.std=[0.5, 0.0, 0.5]", "data.std"),
    ("data.mean=[0.5, nan, 0.5]", "data.mean.1"),
    ('run.out_dir=""', "run.out_dir"),
])
def test_a_meaningless_value_is_one_line_naming_its_key(setting: str, key: str) -> None:
    with pytest.raises(BadInputError) as err:
        load_recipe(DEMO, [setting])
    message = str(err.value)
    assert f"{key}:" in message and len(message.strip().splitlines()) == 1, message


def test_a_non_finite_number_in_the_file_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(DEMO.read_text() + "\n[probe]\nholdout_fraction = nan\n")
    with pytest.raises(BadInputError, match=r"probe\.holdout_fraction"):
        load_recipe(recipe)


def test_arrays_still_fill_tuple_keys_and_integers_fill_float_keys() -> None:
    r = load_recipe(DEMO, ["data.crop_scale=[0.3, 1]", "optim.betas=[0.9, 0.99]",
                           "optim.base_lr=1", "probe.weight_decays=[0, 1e-3]"])
    assert r.data.crop_scale == (0.3, 1.0) and r.optim.betas == (0.9, 0.99)
    assert r.optim.base_lr == 1.0 and r.probe.weight_decays == (0.0, 1e-3)


def test_a_mask_that_hides_every_patch_is_refused_before_training(tmp_path: Path) -> None:
    from cratemae.tasks.pretrain import pretrain

    recipe = load_recipe(DEMO, ["model.mask_ratio=0.999", "model.depth=1",
                                "model.decoder_depth=1"])
    with pytest.raises(BadInputError, match=r"model\.mask_ratio = 0\.999 leaves no visible "
                                            r"patch of the 64"):
        pretrain(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", [
    "probe.pool=avg", "data.train=/data/train", "data.val=pipe:cat a.tar", "optim.lr=1e-4x",
    "run.out_dir=",
])
def test_a_value_that_is_not_toml_is_an_error_showing_the_quoted_form(setting: str) -> None:
    key, _, text = setting.partition("=")
    with pytest.raises(BadInputError) as err:
        load_recipe(DEMO, [setting])
    assert str(err.value) == (f"--set {setting}: not a TOML value; a string needs quotes: "
                              f"--set '{key}=\"{text}\"'")


def test_quoted_strings_still_set_string_keys() -> None:
    r = load_recipe(DEMO, ['probe.pool="avg"', "run.out_dir='runs/x'",
                           'data.val="pipe:cat a.tar"'])
    assert (r.probe.pool, r.run.out_dir, r.data.val) == ("avg", "runs/x", "pipe:cat a.tar")


def run_cratemae(shell_line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`cratemae ARGS` as a shell runs it (so its quotes are the shell's)."""
    return subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m cratemae "
                           f"{shell_line}"], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def test_a_bare_word_on_the_command_line_is_one_line_and_its_suggestion_works(
        tmp_path: Path) -> None:
    # model.depth=-1 stops the command at validation whatever happens to the bare word.
    bare = run_cratemae("pretrain demo --set run.out_dir=runs/x --set model.depth=-1", tmp_path)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert bare.stderr.splitlines() == [
        "error: --set run.out_dir=runs/x: not a TOML value; a string needs quotes: "
        "--set 'run.out_dir=\"runs/x\"'"], bare.stderr
    suggested = bare.stderr.strip().rpartition(": ")[2]
    # The suggestion, pasted into a shell, parses: only the other, out-of-range key is blamed.
    pasted = run_cratemae(f"pretrain demo {suggested} --set model.depth=-1", tmp_path)
    assert pasted.returncode == 2
    assert pasted.stderr.startswith("error: --set model.depth=-1: model.depth: "), pasted.stderr
    assert "run.out_dir" not in pasted.stderr and not (tmp_path / "runs").exists()
