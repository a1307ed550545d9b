"""The README's set-up commands, CI's entry point and the shipped recipes agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import REPO

from cratemae.recipe import load_recipe


def setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands_install_then_test() -> None:
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("cratemae pretrain recipes/demo.toml")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_from_a_fresh_environment() -> None:
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    lines = [line.strip() for line in script if line.strip() and not line.startswith("#")]
    assert "set -euo pipefail" in lines
    assert "rm -rf .venv" in lines
    assert lines.index("rm -rf .venv") < lines.index(setup_commands()[1])
    assert "not slow" not in setup_commands()[1]  # CI runs the slow tests (the wheel's) too


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.toml")), ids=str)
def test_every_shipped_recipe_is_valid(path: Path) -> None:
    load_recipe(path)


def test_readme_commands_exist() -> None:
    from importlib import metadata

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    used = set(re.findall(r"^cratemae ([a-z][a-z-]*)", readme, re.M))  # not `--version`
    registered = {ep.name for ep in metadata.entry_points(group="cratemae.commands")}
    assert used and used <= registered, used - registered


def test_readme_recipes_run_from_a_clone_and_by_name_from_an_installed_package() -> None:
    """Each `recipes/NAME.toml` the README (or a shipped recipe's comment) runs is a file of
    the clone and the shipped recipe `NAME`, which is what an installed package runs."""
    from cratemae.recipe import find_recipe

    texts = [(REPO / "README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in (REPO / "recipes").rglob("*.toml")]
    paths = {m for text in texts for m in re.findall(r"\brecipes/[a-z0-9_/]+\.toml\b", text)}
    assert "recipes/base.toml" in paths and "recipes/probe/cifar10.toml" in paths
    for path in sorted(paths):
        assert (REPO / path).is_file(), path
        name = path.removeprefix("recipes/").removesuffix(".toml")
        assert find_recipe(name).read_text() == (REPO / path).read_text(), path
