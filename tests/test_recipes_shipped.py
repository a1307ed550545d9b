"""The shipped recipes: one copy (the repository's `recipes/`), found by name by every command
that takes a recipe, and listed, shown and copied by `cratemae recipes`."""

from __future__ import annotations

import re
from importlib import metadata, resources
from pathlib import Path

import pytest
import typer
from support import REPO
from typer.testing import CliRunner

from cratemae.commands.app import ENTRY_POINT_GROUP, build_app
from cratemae.errors import BadInputError
from cratemae.recipe import find_recipe, list_recipes, load_recipe, resolve_recipe
from cratemae.recipe.shipped import ShippedRecipe, describe

FILES = sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix()
               for p in (REPO / "recipes").rglob("*.toml"))
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "CI": "1"}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return build_app()  # the installed entry points, `recipes` among them


def invoke(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=ENV)
    return result.exit_code, result.stdout, result.stderr


# --- one copy, every recipe -------------------------------------------------------------------
def test_the_shipped_recipes_are_the_repositorys_recipes_folder() -> None:
    """An editable install reads the clone's files: no second copy to keep in step."""
    assert Path(str(resources.files("cratemae.recipes"))) == REPO / "recipes"
    assert not (REPO / "cratemae" / "recipes").exists()
    assert [r.name for r in list_recipes()] == sorted(FILES, key=lambda n: (n.count("/"), n))
    assert {"demo", "base", "probe/cifar10", "finetune/in1k"} <= set(FILES)


@pytest.mark.parametrize("recipe", list_recipes(), ids=lambda r: r.name)
def test_every_recipe_has_a_one_line_description(recipe: ShippedRecipe) -> None:
    text = recipe.description
    assert text and text == describe((REPO / "recipes" / f"{recipe.name}.toml").read_text())
    assert text.count("(") == text.count(")") and text.count("`") % 2 == 0, text
    last = text.rsplit(" ", 1)[-1]
    assert not text.endswith(",") and last not in {"a", "the", "on", "of", "and", "with"}, text


def test_describe_takes_the_first_comment_line() -> None:
    assert describe("\n# Tiny model on the demo data:\n# more\n[model]\n") == (
        "Tiny model on the demo data")
    assert describe("[model]\n# not a description\n") == ""


# --- by name ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "demo.toml", "probe/cifar10", "finetune/in1k.toml"])
def test_a_name_loads_the_shipped_recipe(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    file = REPO / "recipes" / (name.removesuffix(".toml") + ".toml")
    assert load_recipe(name) == load_recipe(file)
    assert resolve_recipe(name) == file


def test_an_existing_file_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("[run]\nseed = 123\n")
    assert resolve_recipe("demo") == Path("demo")
    assert load_recipe("demo").run.seed == 123
    assert load_recipe("demo.toml").run.seed != 123  # no file of that name: the shipped one


@pytest.mark.parametrize(("name", "close"), [
    ("demoo", "did you mean demo, finetune/demo, probe/demo?"),
    ("recipes/demo.toml", "did you mean demo?"),  # a clone's path, outside a clone
    ("cifar10", "did you mean finetune/cifar10, probe/cifar10?"),
    ("prob/cifar100", "did you mean probe/cifar100"),
    ("zzz", "; 'cratemae recipes' lists them"),
])
def test_an_unknown_name_is_one_line_with_the_close_matches(
    name: str, close: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError) as err:
        load_recipe(name)
    message = str(err.value)
    assert message.startswith(f"{name}: recipe file not found, and no shipped recipe has")
    assert close in message and "\n" not in message
    with pytest.raises(BadInputError, match=rf"^{re.escape(name)}: no shipped recipe has"):
        find_recipe(name)


def test_commands_run_a_recipe_by_name(app: typer.Typer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain, probe and finetune resolve the name (the recipe is read, so a bad --set is
    what they then refuse, and nothing trains); an unknown name is one line and exit 2."""
    monkeypatch.chdir(tmp_path)
    ckpt = ["--checkpoint", str(tmp_path)]
    for args in (["pretrain", "demo"], ["probe", "probe/demo", *ckpt],
                 ["finetune", "finetune/demo", *ckpt]):
        code, _, err = invoke(app, *args, "--set", "optim.weight_decay=-1")
        assert code == 2 and err.startswith(
            "error: --set optim.weight_decay=-1: optim.weight_decay:"), err
    code, _, err = invoke(app, "probe", "probe/cifar", *ckpt)
    assert code == 2 and err.splitlines() == [
        "error: probe/cifar: recipe file not found, and no shipped recipe has that name; "
        "did you mean probe/cifar10, probe/cifar100? ('cratemae recipes' lists them)"]


# --- cratemae recipes -------------------------------------------------------------------------
def test_recipes_command_is_registered() -> None:
    assert ENTRY_POINT_GROUP and "recipes" in {
        ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def test_recipes_lists_every_name_with_its_description(app: typer.Typer) -> None:
    code, out, _ = invoke(app, "recipes")
    assert code == 0
    rows = [re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines()]
    assert [name for name, _ in rows] == [r.name for r in list_recipes()]
    assert [text for _, text in rows] == [r.description for r in list_recipes()]


def test_recipes_show_prints_the_file(app: typer.Typer) -> None:
    code, out, _ = invoke(app, "recipes", "show", "probe/demo")
    assert code == 0 and out == (REPO / "recipes" / "probe" / "demo.toml").read_text()


def test_recipes_copy_writes_an_editable_copy_and_refuses_to_overwrite(
    app: typer.Typer, tmp_path: Path
) -> None:
    original = (REPO / "recipes" / "base.toml").read_text()
    dest = tmp_path / "my-base.toml"
    code, _, err = invoke(app, "recipes", "copy", "base", str(dest))
    assert code == 0 and dest.read_text() == original
    assert f"cratemae pretrain {dest}" in err
    dest.write_text("# mine\n")
    code, _, err = invoke(app, "recipes", "copy", "base", str(dest))
    assert code == 2
    assert err.splitlines() == [f"error: {dest}: already exists; --force overwrites it"]
    assert dest.read_text() == "# mine\n"
    code, _, _ = invoke(app, "recipes", "copy", "base", str(dest), "--force")
    assert code == 0 and dest.read_text() == original


def test_recipes_copy_into_a_directory(app: typer.Typer, tmp_path: Path) -> None:
    code, _, err = invoke(app, "recipes", "copy", "probe/cifar10", str(tmp_path))
    assert code == 0 and (tmp_path / "cifar10.toml").is_file()
    assert f"cratemae probe {tmp_path / 'cifar10.toml'} --checkpoint CKPT" in err
    code, _, _ = invoke(app, "recipes", "copy", "finetune/in1k", f"{tmp_path}/new/")
    assert code == 0 and (tmp_path / "new" / "in1k.toml").is_file()


@pytest.mark.parametrize("case", ["unknown name", "parent is a file", "a directory"])
def test_recipes_bad_input_is_one_line_exit_2(app: typer.Typer, tmp_path: Path,
                                              case: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir" / "demo.toml").mkdir(parents=True)
    args, message = {
        "unknown name": (["show", "dmeo"], "dmeo: no shipped recipe has that name; did you mean"),
        "parent is a file": (["copy", "demo", str(tmp_path / "file" / "x.toml")],
                             f"{tmp_path / 'file' / 'x.toml'}: cannot write: "),
        "a directory": (["copy", "demo", str(tmp_path / "dir")],
                        f"{tmp_path / 'dir' / 'demo.toml'}: is a directory"),
    }[case]
    code, _, err = invoke(app, "recipes", *args)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err
    assert (tmp_path / "file").read_text() == "x"
