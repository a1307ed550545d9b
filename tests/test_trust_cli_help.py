"""Every command's `--help` at 80 columns: no line longer, prose wrapped as paragraphs, and
every example whole (a long one broken with a shell continuation, its words intact)."""

from __future__ import annotations

import inspect

import pytest
import typer
from support import cli

from cratemae.commands.app import EXAMPLE_WIDTH, build_app, help_text


@pytest.fixture(autouse=True)
def _width_from_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer reads TERMINAL_WIDTH once, when its help renderer is first imported: a test
    that rendered help under TERMINAL_WIDTH=200 before this file would fix every width."""
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None, raising=False)


def command_paths() -> list[list[str]]:
    app = typer.main.get_command(build_app())
    paths: list[list[str]] = [[]]
    for name, command in app.commands.items():
        paths.append([name])
        paths.extend([name, sub] for sub in getattr(command, "commands", {}) or {})
    return paths


def doc_of(path: list[str]) -> str:
    command = typer.main.get_command(build_app())
    for name in path:
        command = command.commands[name]
    return inspect.cleandoc(getattr(command.callback, "__doc__", None) or "")


def examples_shown(text: str) -> list[str]:
    """The `$ ` lines of a help output, continuation lines joined, spaces collapsed."""
    lines = [line.strip(" │") for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith(" \\"):
            out[-1] = out[-1][:-2] + " " + line.strip()
        elif line.strip().startswith("$ "):
            out.append(line.strip())
    return [" ".join(e.split()) for e in out]


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "cratemae")
def test_help_fits_80_columns_and_keeps_every_example_whole(path):
    result = cli(*path, "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    too_long = [line for line in result.stdout.splitlines() if len(line) > 80]
    assert not too_long, too_long
    wanted = examples_shown(doc_of(path))
    shown = examples_shown(result.stdout)
    assert [w for w in wanted if w not in shown] == []


def test_prose_is_one_paragraph_and_examples_stay_lines():
    doc = """Title.

    A paragraph written
    over two lines.

    Examples:
      $ cratemae export runs/base/checkpoints/step-000100000 --out exported/base --encoder-only
      $ cratemae probe probe/demo --checkpoint runs/demo  # into runs/demo-probe
    """
    text = help_text(doc)
    assert "A paragraph written over two lines." in text
    lines = text.split("Examples:\n")[1].splitlines()
    assert all(len(line) <= EXAMPLE_WIDTH for line in lines)
    assert lines[0].endswith(" \\") and lines[1].startswith("      ")
    assert "# into runs/demo-probe" in text
