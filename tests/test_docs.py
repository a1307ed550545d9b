"""The README's set-up commands, CI's entry point and the shipped recipes agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cratemae.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.toml")), ids=str)
def test_every_shipped_recipe_is_valid(path: Path) -> None:
    load_recipe(path)


def test_readme_commands_exist() -> None:
    from importlib import metadata

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    used = set(re.findall(r"^cratemae ([a-z-]+)", readme, re.M))
    registered = {ep.name for ep in metadata.entry_points(group="cratemae.commands")}
    assert used and used <= registered, used - registered
