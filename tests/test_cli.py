"""The command line: discovery, help, error handling, and the console helpers."""

from __future__ import annotations

import inspect
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from cratemae import __version__
from cratemae.commands import console
from cratemae.commands.app import ENTRY_POINT_GROUP, build_app, guard
from cratemae.errors import CrateMAEError

ENV = {"COLUMNS": "200", "LINES": "100", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
BUILTINS = {
    "pretrain": "Pre-train CRATE-MAE from a recipe.",
    "probe": "Linear-probe a pre-trained encoder.",
    "finetune": "Fine-tune a pre-trained encoder with a new classification head.",
    "export": "Export weights for other tools.",
    "reconstruct": "Mask an image and show the model's reconstruction.",
}


class Run:
    """A finished invocation with ANSI-free `out` (stdout) and `err` (stderr)."""

    def __init__(self, result: Result) -> None:
        self.code = result.exit_code
        self.exception = result.exception
        self.out = ANSI.sub("", result.stdout)
        try:  # older CliRunners mix stderr into stdout and refuse `.stderr`
            self.err = ANSI.sub("", result.stderr)
        except ValueError:
            self.err = self.out
        self.all = self.out + self.err
        self.help = "\n".join(lines(self.out))  # rich help without its box borders


def invoke(app: typer.Typer, args: Sequence[str], **env: str) -> Run:
    return Run(CliRunner().invoke(app, list(args), env={**ENV, **env}))


def lines(text: str) -> list[str]:
    """The lines of rich help output, without box borders and padding."""
    return [line.strip().strip("│").strip() for line in text.splitlines()]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return build_app()  # the installed `cratemae.commands` entry points


# -- third-party commands, loaded through fake entry points ---------------------------------


def hello(name: str = typer.Option("world", help="Who to greet.")) -> None:
    """Say hello from a plugin.

    Examples:
      $ cratemae hello --name you
    """
    typer.echo(f"hello {name}")


def goodbye() -> None:
    """Say goodbye."""
    typer.echo("goodbye")


def fails(code: int = 3) -> None:
    """Fail with a library error."""
    raise CrateMAEError("first line\nsecond line", exit_code=code)


def interrupted() -> None:
    """Act as if Ctrl-C was pressed."""
    raise KeyboardInterrupt


def union_param(x: int | str = 1) -> None:
    """A signature Typer refuses."""


NOT_A_COMMAND = 42

extras = typer.Typer(help="Benchmarks.")


@extras.command("data")
def bench_data(fail: bool = False) -> None:
    """Time the data loader."""
    if fail:
        raise CrateMAEError("no shards", exit_code=2)
    typer.echo("bench data ran")


def ep(name: str, obj: Callable[..., object] | typer.Typer | str) -> metadata.EntryPoint:
    attr = obj if isinstance(obj, str) else name if isinstance(obj, typer.Typer) else obj.__name__
    value = attr if ":" in attr else f"{__name__}:{attr}"
    return metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def with_builtins(*extra: metadata.EntryPoint) -> typer.Typer:
    return build_app([*metadata.entry_points(group=ENTRY_POINT_GROUP), *extra])


# -- the app ----------------------------------------------------------------------------------


def test_version(app: typer.Typer) -> None:
    run = invoke(app, ["--version"])
    assert run.code == 0
    assert run.out == f"cratemae {__version__}\n"


def test_no_arguments_shows_help(app: typer.Typer) -> None:
    run = invoke(app, [])
    assert "Usage:" in run.all
    assert all(name in run.all for name in BUILTINS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_commands_with_descriptions(app: typer.Typer, flag: str) -> None:
    run = invoke(app, [flag])
    assert run.code == 0
    for name, description in BUILTINS.items():
        assert re.search(rf"^{name}\s+{re.escape(description)}$", run.help, re.M), name


@pytest.mark.parametrize("name", BUILTINS)
def test_command_help_shows_examples_line_by_line(app: typer.Typer, name: str) -> None:
    func = metadata.entry_points(group=ENTRY_POINT_GROUP)[name].load()
    doc = inspect.getdoc(func) or ""
    assert doc.splitlines()[0] == BUILTINS[name]
    examples = joined_examples(doc.splitlines())
    assert len(examples) >= 2
    run = invoke(app, [name, "--help"])
    assert run.code == 0
    shown = lines(run.out)
    assert "Examples:" in shown
    for example in examples:
        assert f"cratemae {name} " in example  # may follow a launcher: torchrun -m ...
        assert example in joined_examples(shown), f"{example!r} is not shown whole"


def joined_examples(text_lines: list[str]) -> list[str]:
    """The `$ ` lines, each with the lines it continues onto (` \\`), spaces collapsed: a
    long example is broken with a shell continuation to fit 80 columns."""
    out: list[str] = []
    for line in (line.strip() for line in text_lines):
        if out and out[-1].endswith(" \\"):
            out[-1] = out[-1][:-2] + " " + line
        elif line.startswith("$ "):
            out.append(line)
    return [" ".join(e.split()) for e in out]


def test_help_shows_no_python_type_names(app: typer.Typer) -> None:
    """Flags without `<bool>`, lists without `list[Path]`: the words a user reads."""
    names = sorted(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert {"pretrain", "reconstruct", "analyze", "bench-data"} <= set(names)
    for name in names:
        run = invoke(app, [name, "--help"])
        assert run.code == 0, name
        bad = re.findall(r"<(?:bool|int|str|float|Path|list\[[^]]*\])>|list\[\w+\]", run.out)
        assert not bad, f"{name} --help shows {bad}"
    shown = lines(invoke(app, ["reconstruct", "--help"]).out)
    assert any(re.match(r"\* +IMAGE\.\.\. +Image files", line) for line in shown)
    assert any(re.match(r"--seed +INTEGER +Seed", line) for line in shown)
    assert any(re.match(r"--help +-h +Show this message", line) for line in shown)


def test_help_lists_exit_codes(app: typer.Typer) -> None:
    assert "3 stopped to be requeued" in " ".join(lines(invoke(app, ["--help"]).out))


# -- input checks and recipe errors ---------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {"recipe": "recipe.toml", "ckpt": "last.pt", "image": "photo.jpg"}
    for path in paths.values():
        (tmp_path / path).write_text("")
    return {key: str(tmp_path / path) for key, path in paths.items()} | {"dir": str(tmp_path)}




def test_pretrain_without_training_data_exits_2_and_creates_nothing(
    app: typer.Typer, files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    run = invoke(app, ["pretrain", files["recipe"], "--json"])
    assert run.code == 2, run.all
    assert run.err.splitlines()[-1] == "error: data.train: no training data given in the recipe"
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("reconstruct {image} --mask-ratio 1.0", "--mask-ratio 1.0: expected a value in [0, 1)"),
        ("reconstruct {dir}/nope.jpg", "{dir}/nope.jpg: image not found"),
        ("probe {recipe} --checkpoint {dir}/nope.pt", "{dir}/nope.pt: checkpoint not found"),
        ("export {dir}/nope.pt --out {dir}", "{dir}/nope.pt: checkpoint not found"),
        ("pretrain {recipe} --resume {dir}/nope.pt", "--resume {dir}/nope.pt: no such checkpoint"),
    ],
)
def test_commands_check_their_options(
    app: typer.Typer, files: dict[str, str], args: str, message: str
) -> None:
    run = invoke(app, args.format(**files).split())
    assert run.code == 2
    assert run.err.startswith(f"error: {message.format(**files)}")
    assert "not built" not in run.all


BAD_RECIPES = {
    "unknown key": ('[model]\nnme = "x"\n', [],
                    "model.nme: unknown key (did you mean model.name?)"),
    "wrong type": ('[optim]\nlr = "fast"\n', [], "optim.lr: Input should be a valid number"),
    "missing file": (None, [], "recipe file not found"),
    "invalid toml": ("[model\n", [], "invalid TOML"),
    "bad --set type": ("", ["--set", "model.depth=-1"], "model.depth: Input should be greater"),
    "bad --set syntax": ("", ["--set", "model.depth"], "--set 'model.depth': expected key.path"),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
@pytest.mark.parametrize("name", ["pretrain", "probe", "finetune"])
def test_bad_recipe_is_one_line_exit_2(
    app: typer.Typer, tmp_path: Path, case: str, name: str
) -> None:
    text, extra, expected = BAD_RECIPES[case]
    recipe = tmp_path / "recipe.toml"
    if text is not None:
        recipe.write_text(text)
    ckpt = ["--checkpoint", str(recipe)] if name != "pretrain" else []
    run = invoke(app, [name, str(recipe), *ckpt, *extra])
    assert run.code == 2
    assert len(run.err.splitlines()) == 1, run.err
    assert run.err.startswith("error: ")
    assert expected in run.err
    if case == "bad --set type":  # the value came from the --set, not from the file
        assert run.err.startswith("error: --set model.depth=-1: model.depth: "), run.err
    elif case != "bad --set syntax":
        assert f"{recipe}: " in run.err
    assert "Traceback" not in run.all


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_traceback(app: typer.Typer, tmp_path: Path, how: str) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nnme = "x"\n')
    args, env = (["--debug"], {}) if how == "flag" else ([], {"CRATEMAE_DEBUG": "1"})
    run = invoke(app, [*args, "pretrain", str(recipe)], **env)
    assert run.code == 2
    assert "Traceback (most recent call last)" in run.err
    assert "BadInputError" in run.err
    assert run.err.splitlines()[-1] == (f"error: {recipe}: model.nme: unknown key "
                                        "(did you mean model.name?)")


# -- plugins ----------------------------------------------------------------------------------


def test_plugin_command_is_listed_and_runs() -> None:
    app = with_builtins(ep("hello", hello))
    run = invoke(app, ["--help"])
    assert re.search(r"^hello\s+Say hello from a plugin\.$", run.help, re.M)
    assert re.search(rf"^pretrain\s+{re.escape(BUILTINS['pretrain'])}$", run.help, re.M)
    run = invoke(app, ["hello", "--name", "you"])
    assert (run.code, run.out) == (0, "hello you\n")


def test_default_discovery_reads_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[str | None] = []

    def fake_entry_points(*, group: str | None = None) -> list[metadata.EntryPoint]:
        groups.append(group)
        return [ep("hello", hello)]

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    run = invoke(build_app(), ["hello"])
    assert groups == [ENTRY_POINT_GROUP]
    assert (run.code, run.out) == (0, "hello world\n")


def test_plugin_group_runs_and_is_guarded() -> None:
    app = with_builtins(ep("extras", extras))
    assert re.search(r"^extras\s+Benchmarks\.$", invoke(app, ["--help"]).help, re.M)
    assert re.search(r"^data\s+Time the data loader\.$", invoke(app, ["extras", "-h"]).help, re.M)
    assert invoke(app, ["extras", "data"]).out == "bench data ran\n"
    run = invoke(app, ["extras", "data", "--fail"])
    assert (run.code, run.err) == (2, "error: no shards\n")


def test_error_exit_code_and_every_line_prefixed() -> None:
    app = build_app([ep("fails", fails)])
    run = invoke(app, ["fails", "--code", "3"])
    assert (run.code, run.err) == (3, "error: first line\nerror: second line\n")


def test_keyboard_interrupt_exits_130() -> None:
    run = invoke(build_app([ep("interrupted", interrupted)]), ["interrupted"])
    assert (run.code, run.err) == (130, "error: interrupted\n")


def test_other_exceptions_propagate() -> None:
    def boom() -> None:
        raise RuntimeError("a bug")

    app = typer.Typer()
    app.command()(guard(boom))
    result = CliRunner().invoke(app, [], env=ENV)
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("no_such_module_for_cratemae:func", "ModuleNotFoundError"),
        (f"{__name__}:no_such_attribute", "AttributeError"),
        ("NOT_A_COMMAND", "TypeError"),
        ("union_param", ""),  # Typer cannot build it: caught at startup, not later
    ],
)
def test_broken_entry_point_is_listed_and_others_work(target: str, why: str) -> None:
    app = with_builtins(ep("broken", target), ep("hello", hello))
    run = invoke(app, ["--help"])
    assert run.code == 0
    assert re.search(r"^broken\s+\(broken\) cannot load command broken", run.help, re.M)
    assert re.search(rf"^pretrain\s+{re.escape(BUILTINS['pretrain'])}$", run.help, re.M)
    assert invoke(app, ["hello"]).out == "hello world\n"
    run = invoke(app, ["broken", "--any", "args"])
    assert run.code == 1
    assert run.err.startswith(f"error: cannot load command broken: {why}")
    assert len(run.err.splitlines()) == 1


def test_duplicate_name_first_wins_with_warning(capsys: pytest.CaptureFixture[str]) -> None:
    app = build_app([ep("hello", hello), ep("hello", hello), ep("hello", goodbye)])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1  # the identical duplicate is silent
    assert "command hello is defined twice" in err
    assert f"ignoring {__name__}:goodbye" in err
    assert invoke(app, ["hello"]).out == "hello world\n"


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "cratemae"], [str(Path(sys.executable).with_name("cratemae"))]],
    ids=["python -m cratemae", "console script"],
)
def test_real_entry_point(command: list[str]) -> None:
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} is not installed")
    env = {**os.environ, **ENV}
    proc = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = ANSI.sub("", proc.stdout)
    assert "Usage: cratemae " in out
    assert all(re.search(rf"^\W*{name}\s", out, re.M) for name in BUILTINS)


# -- console helpers --------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "env", "expected"),
    [
        (FakeTTY(), {}, True),
        (io.StringIO(), {}, False),
        (FakeTTY(), {"CI": "true"}, False),
        (FakeTTY(), {"CI": "0"}, True),
        (FakeTTY(), {"TERM": "dumb"}, False),
    ],
)
def test_is_interactive(
    monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, env: dict[str, str], expected: bool
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert console.is_interactive(stream) is expected


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_log_plain_and_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    plain, tty = io.StringIO(), FakeTTY()
    console.log("step 10 loss [0.5]", stream=plain)
    console.log("step 10 loss [0.5]", stream=tty)
    assert re.fullmatch(rf"{STAMP} step 10 loss \[0\.5\]\n", plain.getvalue())
    assert re.search(r"\d\d:\d\d:\d\d step 10 loss \[0\.5\]", ANSI.sub("", tty.getvalue()))


class Clock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_progress_plain_every_percent() -> None:
    out = io.StringIO()
    with console.progress(100, "epoch 1", stream=out, every_percent=25, clock=Clock(0)) as bar:
        for i in range(100):
            bar.advance(info=f"loss {i}")
    got = [re.sub(rf"^{STAMP} ", "", line) for line in out.getvalue().splitlines()]
    assert [line.split(" elapsed")[0] for line in got] == [
        f"epoch 1: {n}/100 ({n}%)" for n in (25, 50, 75, 100)
    ]
    assert got[0].endswith("eta 0:00:00 loss 24")
    assert got[-1].endswith("done loss 99")


def test_progress_plain_every_seconds_and_stopped() -> None:
    out = io.StringIO()
    with (
        pytest.raises(KeyboardInterrupt),
        console.progress(None, "scan", stream=out, every_seconds=30, clock=Clock(10)) as bar,
    ):
        for _ in range(7):
            bar.advance()
        raise KeyboardInterrupt
    got = [re.sub(rf"^{STAMP} ", "", line) for line in out.getvalue().splitlines()]
    assert [line.split(" elapsed")[0] for line in got] == ["scan: 3", "scan: 6", "scan: 7"]
    assert got[-1].endswith("stopped")


def test_progress_rich_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    tty = FakeTTY()
    with console.progress(4, "epoch [2]", stream=tty) as bar:
        for _ in range(4):
            bar.advance(info="loss 0.1")
    text = ANSI.sub("", tty.getvalue())
    assert "epoch [2]" in text
    assert "4/4" in text
    assert not re.search(STAMP, text)


def test_next_steps_are_called_as_the_user_called_cratemae(tmp_path):
    """Right after the README's set-up, cratemae is `.venv/bin/cratemae`, not on PATH: the
    printed next steps call it (and the tensorboard beside it) by that path."""
    from cratemae.commands.console import as_invoked

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "tensorboard").write_text("")
    text = "next:\n  cratemae probe probe/demo --checkpoint runs/demo\n  tensorboard --logdir x"
    shown = as_invoked(text, argv0=str(bin_dir / "cratemae"))
    assert f"  {bin_dir / 'cratemae'} probe probe/demo --checkpoint runs/demo" in shown
    assert f"  {bin_dir / 'tensorboard'} --logdir x" in shown
    assert as_invoked(text, argv0="cratemae") == text  # found on PATH: as printed
