"""A checkpoint's meta.json edited by hand (wrong types, missing fields, a negative step) is
refused in one line naming the field: never a traceback, never a run at a negative step, and
never silently passed over for an older checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import REPO, TINY_RUN
from typer.testing import CliRunner, Result

from cratemae.commands.app import build_app
from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import pretrain
from cratemae.weights.load import load_model


def cratemae(*args: object) -> Result:
    """The command line, in this process (plain output, as in a cluster log)."""
    return CliRunner().invoke(build_app(), [str(a) for a in args], env={"CI": "true"})

TINY = [
    *TINY_RUN, "run.checkpoint_every_steps=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "run"
    pretrain(load_recipe(REPO / "recipes" / "demo.toml", [*TINY, "schedule.max_steps=2"]),
             run_dir=out)
    return out


EDITS = {
    "negative step": (lambda m: m.update(step=-3), "field 'step' must be a whole number >= 0"),
    "step as text": (lambda m: m.update(step="2"), "field 'step' must be a whole number"),
    "no data position": (lambda m: m.pop("data_position"), "field 'data_position' is missing"),
    "negative batch": (lambda m: m["data_position"].update(batch=-1),
                       "field 'data_position' must be an object"),
    "wall time as text": (lambda m: m.update(wall_time="noon"),
                          "field 'wall_time' must be a number"),
    "end of epoch as text": (lambda m: m.update(end_of_epoch="yes"),
                             "field 'end_of_epoch' must be true or false"),
    "bad samples as float": (lambda m: m.update(bad_samples=1.5),
                             "field 'bad_samples' must be a whole number"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_meta_json_is_refused_naming_the_field(run: Path, tmp_path: Path,
                                                          edit: str) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta_file = copy / "checkpoints" / "step-000000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    change, message = EDITS[edit]
    change(meta)
    meta_file.write_text(json.dumps(meta))
    recipe = load_recipe(REPO / "recipes" / "demo.toml", [*TINY, "schedule.max_steps=4"])
    with pytest.raises(BadInputError, match=r"step-000000002/meta\.json: " + message) as err:
        pretrain(recipe, run_dir=copy)  # resume "auto": the newest checkpoint is the edited
    assert "\n" not in str(err.value)
    with pytest.raises(BadInputError, match=message):  # readers refuse it as well
        load_model(copy)
    assert json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


@pytest.mark.parametrize("where", ["RUN", "RUN/exported", "RUN/checkpoints",
                                   "RUN/checkpoints/step-000000002"])
def test_export_into_the_run_it_reads_is_refused(run: Path, tmp_path: Path, where: str) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    out = where.replace("RUN", str(copy))
    done = cratemae("export", copy, "--out", out)
    assert done.exit_code == 2, done.stderr
    # One line naming the place and why (its wording is cratemae.guard's).
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {out}: ") and "being read" in line, line
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before


def test_export_over_the_export_it_reads_is_refused(run: Path, tmp_path: Path) -> None:
    assert cratemae("export", run, "--out", tmp_path / "exp").exit_code == 0
    weights = (tmp_path / "exp" / "model.safetensors").read_bytes()
    again = cratemae("export", tmp_path / "exp", "--out", tmp_path / "exp")
    assert again.exit_code == 2 and "being read" in again.stderr
    assert (tmp_path / "exp" / "model.safetensors").read_bytes() == weights
