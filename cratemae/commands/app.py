"""The `cratemae` application: global options, command discovery, and error handling.

Every command, built-in or third-party, is an entry point in the `cratemae.commands` group:

    [project.entry-points."cratemae.commands"]
    mycmd = "mypkg.cli:mycmd"          # a function: `cratemae mycmd`
    bench = "mypkg.cli:bench_app"      # a typer.Typer: `cratemae bench ...` (a group)

Each registered function is wrapped by `guard()`: a `CrateMAEError` becomes `error: <message>`
on stderr and its `exit_code`, an `OSError` (a full disk, mid-run) `error: PATH: reason` and
exit status 1, without a traceback unless `--debug` is given.
"""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from cratemae import __version__
from cratemae.commands import console
from cratemae.errors import EXIT_FAILURE, CrateMAEError

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXIT_INTERRUPTED",
    "STATE",
    "AppState",
    "build_app",
    "guard",
    "main",
]

ENTRY_POINT_GROUP = "cratemae.commands"
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])

HELP = "CRATE-MAE, the white-box masked autoencoder: pre-train, probe, fine-tune, export."
EPILOG = (
    "Run 'cratemae COMMAND --help' for a command's options and examples. "
    "Exit codes: 0 ok, 1 failure, 2 bad input, 3 stopped to be requeued, 130 interrupted."
)


@dataclass
class AppState:
    """Global options of the current invocation, set by the app callback."""

    debug: bool = False


STATE = AppState()


def guard(func: F) -> F:
    """Wrap a command so `CrateMAEError` and Ctrl-C end it with a one-line message."""
    if getattr(func, "__cratemae_guarded__", False):
        return func

    @functools.wraps(func)  # keeps the signature and docstring that Typer reads
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CrateMAEError as err:
            if STATE.debug:
                traceback.print_exc(file=sys.stderr)
            console.error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            if STATE.debug:
                traceback.print_exc(file=sys.stderr)
            console.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as err:  # a full disk, a file that vanished, a lost mount: mid-run
            if STATE.debug:
                traceback.print_exc(file=sys.stderr)
            console.error(_os_error_line(err))
            raise typer.Exit(EXIT_FAILURE) from None

    wrapper.__cratemae_guarded__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _os_error_line(err: OSError) -> str:
    """`PATH: reason` for an operating-system error, on one line."""
    reason = err.strerror or str(err) or type(err).__name__
    where = err.filename if err.filename is not None else ""
    return f"{where}: {reason}".replace("\n", " ") if where else reason.replace("\n", " ")


def _guard_group(group: typer.Typer) -> None:
    """Wrap, in place, every command and callback of a Typer group and its subgroups."""
    for info in group.registered_commands:
        if info.callback is not None:
            info.help = help_text(info.help or info.callback.__doc__)
            info.callback = guard(info.callback)
    if group.registered_callback and group.registered_callback.callback is not None:
        call = group.registered_callback
        call.help = help_text(call.help or call.callback.__doc__)
        call.callback = guard(call.callback)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _guard_group(sub.typer_instance)


# An example line is kept whole up to this many characters; a longer one is broken with
# a shell continuation (` \\`), so that it fits an 80-column `--help` and still pastes.
EXAMPLE_WIDTH = 72


def help_text(doc: str | None) -> str | None:
    """A command's docstring as its `--help` shows it at any width: each prose paragraph
    on one line (rich wraps it to the terminal; Typer's rich mode keeps the docstring's own
    line breaks, which wrap raggedly on a narrow one); example paragraphs (indented lines,
    `$ ` lines, lists) line by line, each `$ ` line longer than EXAMPLE_WIDTH broken with
    a shell continuation."""
    if doc is None:
        return None
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if not any(line.startswith((" ", "$", "-", "*")) for line in lines[1:] + lines[:1]):
            out.append(" ".join(line.strip() for line in lines))
            continue
        out.append("\n".join(part for line in lines for part in _fit_example(line)))
    return "\n\n".join(out)


def _fit_example(line: str) -> list[str]:
    """`line`, or, for a `$ ` example over EXAMPLE_WIDTH, its words in lines that end in ` \\`
    (the continuation lines indented four more)."""
    body = line.lstrip()
    if not body.startswith("$ ") or len(line) <= EXAMPLE_WIDTH:
        return [line]
    indent = line[: len(line) - len(body)]
    command, hash_, comment = body.partition(" # ")
    lines, current = [], indent + command.split()[0]
    for word in command.split()[1:]:
        if len(current) + 1 + len(word) + 2 > EXAMPLE_WIDTH and current.strip() != "$":
            lines.append(current + " \\")
            current = indent + "    " + word
        else:
            current += " " + word
    if hash_:  # a comment is never broken: after a continuation it still comments
        if len(current) + 3 + len(comment) > EXAMPLE_WIDTH:
            lines.append(current + " \\")
            current = indent + "    "
        else:
            current += " "
        current += "# " + comment.strip()
    return [*lines, current]


def _register(app: typer.Typer, name: str, obj: object) -> None:
    if isinstance(obj, typer.Typer):
        _guard_group(obj)
        app.add_typer(obj, name=name)
    elif callable(obj):
        app.command(name=name, help=help_text(obj.__doc__))(guard(obj))
    else:
        raise TypeError(f"expected a function or a typer.Typer, got {type(obj).__name__}")


def _load(ep: metadata.EntryPoint) -> object:
    """Import an entry point and check that Typer can build a command from it."""
    obj = ep.load()
    trial = typer.Typer()
    _register(trial, ep.name, obj)
    typer.main.get_command(trial)  # raises here, not later for the whole app
    return obj


def _register_broken(app: typer.Typer, name: str, err: BaseException) -> None:
    message = f"cannot load command {name}: {type(err).__name__}: {err}"

    def broken() -> None:
        console.error(message)
        raise typer.Exit(EXIT_FAILURE)

    app.command(
        name=name,
        help=escape(f"(broken) {message}"),
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )(broken)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cratemae {__version__}")
        raise typer.Exit()


def _callback(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="CRATEMAE_DEBUG", help="Show full tracebacks on errors."),
    ] = False,
) -> None:
    STATE.debug = debug


def build_app(entry_points: Iterable[metadata.EntryPoint] | None = None) -> typer.Typer:
    """The `cratemae` app with one command per entry point (default: the installed ones)."""
    from cratemae.commands._cli_utils import plain_help_types

    plain_help_types()  # no `<bool>` on flags, no Python type names in any --help
    app = typer.Typer(
        name="cratemae",
        help=HELP,
        epilog=EPILOG,
        no_args_is_help=True,
        rich_markup_mode="rich",
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_callback)
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: dict[str, str] = {}
    for ep in sorted(entry_points, key=lambda ep: ep.name):
        if ep.name in seen:
            if ep.value != seen[ep.name]:
                console.warn(
                    f"command {ep.name} is defined twice; using {seen[ep.name]}, "
                    f"ignoring {ep.value}"
                )
            continue
        seen[ep.name] = ep.value
        try:
            obj = _load(ep)
        except Exception as err:
            _register_broken(app, ep.name, err)
        else:
            _register(app, ep.name, obj)
    return app


def main() -> None:
    """The `cratemae` console script."""
    build_app()(prog_name="cratemae")
