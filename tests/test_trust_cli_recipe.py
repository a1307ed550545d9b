"""Every number and shape a recipe holds is checked where it is read: one line naming the
file (or the `--set`) and the key path, exit 2, never a traceback; and the old pool names."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from support import DEMO_RECIPE, cli

from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe


def refused(text: str, tmp_path: Path, *sets: str) -> str:
    file = tmp_path / "r.toml"
    file.write_text(text)
    with pytest.raises(BadInputError) as err:
        load_recipe(file, sets)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("text, key", [
    ("[run]\nnan_patience = 1e30\n", "run.nan_patience"),
    (f"[run]\nnan_patience = {2**70}\n", "run.nan_patience"),
    (f"[run]\nseed = {2**63}\n", "run.seed"),
    (f"[run]\nseed = {-(2**63) - 1}\n", "run.seed"),
    (f"[data]\ntrain = [{2**64}]\n", "data.train[0]"),
    ("[data]\nepoch_samples = 1.5\n", "data.epoch_samples"),
    ("[data]\nepoch_samples = -3\n", "data.epoch_samples"),
    ("[data]\nnum_workers = -1\n", "data.num_workers"),
    ("[optim]\nlr = nan\n", "optim.lr"),
    ("[optim]\nweight_decay = inf\n", "optim.weight_decay"),
    ("[model]\nmask_ratio = -inf\n", "model.mask_ratio"),
])
def test_a_number_out_of_range_names_its_file_and_key(tmp_path, text, key):
    message = refused(text, tmp_path)
    assert message.startswith(f"{tmp_path / 'r.toml'}: {key}: "), message


def test_a_huge_integer_from_the_command_line_names_the_set(tmp_path):
    message = refused("", tmp_path, f"run.nan_patience={2**70}")
    assert message.startswith(f"--set run.nan_patience={2**70}: run.nan_patience: ")
    assert "beyond a 64-bit integer" in message


@pytest.mark.parametrize("text", [
    "a = " + "[" * 10_000 + "]" * 10_000,
    "a = " + "{b = " * 10_000 + "1" + "}" * 10_000,
    "[" + ".".join(["a"] * 10_000) + "]",
])
def test_a_recipe_nested_10000_deep_is_one_line_not_a_recursion_error(tmp_path, text):
    assert "nested deeper than any recipe" in refused(text, tmp_path)


def test_a_deep_value_on_the_command_line_is_refused_too(tmp_path):
    assert "nested deeper" in refused("", tmp_path, "data.train=" + "[" * 20 + "]" * 20)


def test_an_unclosed_list_on_the_command_line_says_so(tmp_path):
    message = refused("", tmp_path, 'data.train=["a.tar"')
    assert "the list is not closed" in message and "needs quotes" not in message
    message = refused("", tmp_path, "data.train=[a.tar]")
    assert "not a TOML value (a string needs quotes)" in message


def test_a_setting_below_a_value_is_refused(tmp_path):
    message = refused("[run]\nseed = 1\n", tmp_path, "run.seed.c.d=1")
    assert "run.seed is a value, not a section" in message


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    file = tmp_path / "bom.toml"
    file.write_bytes(b"\xef\xbb\xbf[run]\nseed = 7\n")
    assert load_recipe(file).run.seed == 7


def test_a_recipe_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "recipe.toml"
    os.mkfifo(fifo)
    out: list = []

    def load() -> None:
        try:
            load_recipe(fifo)
        except BadInputError as err:
            out.append(str(err))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=1)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the recipe FIFO was opened and waited on")
    assert out and "is a FIFO" in out[0]


def test_the_command_line_exits_2_with_one_line(tmp_path):
    file = tmp_path / "r.toml"
    file.write_text("a = " + "[" * 10_000 + "]" * 10_000)
    result = cli("pretrain", file, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("old, new", [("cls", "token"), ("mean", "avg")])
def test_the_old_pool_names_read_as_timms_with_one_warning(caplog, old, new):
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        recipe = load_recipe(DEMO_RECIPE, [f'probe.pool="{old}"', f'finetune.pool="{old}"'])
    assert recipe.probe.pool == recipe.finetune.pool == new
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(lines) == 2 and f'probe.pool = "{old}" is deprecated' in lines[0]
