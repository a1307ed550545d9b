"""Setting up a run, the same for every task: the launch, the seed, where to resume from, and
the run directory (the resolved recipe, the log file and status.json).

    with RunSetup(recipe, run_dir, resume=Resume.AUTO) as run:  # group, seed, resume
        task = ...                                   # bad input stops here, unwritten
        with run.open_run_dir():                     # recipe.toml, log.txt, status.json
            Trainer(run, task).fit()

A run that starts from a checkpoint (probe, fine-tune) names it (`Source`: the path and the
SHA-256 of its weights) in status.json and in its result file, and a run directory belongs
to that checkpoint: `RunSetup(..., source=...)` refuses one that holds the run of other
weights, or replaces it when asked (`overwrite`). Its default place is
`default_run_dir(checkpoint, kind)`, named after the checkpoint's run.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from cratemae.checkpoints import Resume, find_resume
from cratemae.checkpoints.resolve import run_dir_of
from cratemae.distributed import dist
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.fs import atomic_write_text
from cratemae.guard import check_output, special_kind
from cratemae.recipe import Recipe, dump_recipe
from cratemae.rundir import MODEL_FILE, RUNS_DIR, RunFiles
from cratemae.train.lock import RunLock
from cratemae.train.run_dir import log_file, recorded_source, write_status

__all__ = ["RunSetup", "Source", "default_run_dir", "run_dir_for"]

log = logging.getLogger("cratemae")


@dataclass(frozen=True)
class Source:
    """The checkpoint a run starts from: the path the user named it by, and the SHA-256 of
    its weights file (what the run's results depend on; None only when no file records it,
    as for embeddings files written without one)."""

    path: str
    sha256: str | None

    def fields(self) -> dict[str, Any]:
        """What status.json and the result file record of it."""
        return {"checkpoint": self.path, "checkpoint_sha256": self.sha256}

    def same_as(self, recorded: dict[str, Any]) -> bool:
        """Whether a run that recorded `recorded` started from these weights: by the digest
        (another path to the same bytes is the same checkpoint); a record without one (an
        older run) by the path."""
        theirs = recorded.get("checkpoint_sha256")
        if theirs and self.sha256:
            return bool(theirs == self.sha256)
        path = recorded.get("checkpoint")
        return path is not None and os.path.abspath(str(path)) == os.path.abspath(self.path)

    def describe(self) -> str:
        return f"{self.path} (sha256 {self.sha256[:12]})" if self.sha256 else self.path


def default_run_dir(checkpoint: str | os.PathLike[str], kind: str,
                    recipe_name: str | None = None) -> Path:
    """Where a `kind` ("probe", "finetune") of `checkpoint` goes when no --out or
    run.out_dir says: `runs/<name>-<kind>`, named after the checkpoint's run (`runs/demo` ->
    `runs/demo-probe`), or for weights outside a run after their folder or file stem
    (`exported/base/model.safetensors` -> `runs/base-probe`). A recipe named otherwise than
    the run adds its name (`runs/base-cifar10-probe`): two recipes, or two checkpoints,
    never share a directory by default. A run inside ./runs keeps its folder there
    (`runs/sweep/a` -> `runs/sweep/a-probe`); any other goes under ./runs."""
    path = Path(checkpoint)
    run = run_dir_of(path)
    if run is not None:
        name, where = run.name, run.parent
    else:
        name = path.name if path.is_dir() else (
            path.parent.name if path.name == MODEL_FILE else path.stem)
        where = RUNS_DIR.absolute()
    parts = [name or "checkpoint"]
    if recipe_name and recipe_name not in (name, kind):
        parts.append(recipe_name)
    folder = "-".join([*parts, kind])
    runs = RUNS_DIR.absolute()
    if where == runs or where.is_relative_to(runs):
        return RUNS_DIR / where.relative_to(runs) / folder
    return RUNS_DIR / folder


def run_dir_for(recipe: Recipe, checkpoint: str | os.PathLike[str], kind: str, *,
                out: str | os.PathLike[str] | None = None, recipe_name: str | None = None,
                reads: tuple[Path, ...] = ()) -> Path:
    """Where a `kind` of `checkpoint` writes: `out` (--out), else the recipe's run.out_dir
    when the recipe sets it, else `default_run_dir`; refused (exit 2) when it is no place
    for a run directory, or is, holds or lies inside what the run reads (the checkpoint,
    its run, `reads`)."""
    if out is not None:
        where, flag = Path(out), "--out"
    elif "out_dir" in recipe.run.model_fields_set:
        where, flag = Path(recipe.run.out_dir), "run.out_dir"
    else:
        where, flag = default_run_dir(checkpoint, kind, recipe_name), "run directory"
    inputs = [Path(checkpoint), *reads]
    run = run_dir_of(checkpoint) if Path(checkpoint).exists() else None
    inputs += [run] if run is not None else []
    return check_output(where, kind="dir", reads=inputs, flag=flag)


class RunSetup:
    """Entering starts listening for the stop signals (SIGTERM, SIGUSR1: the first step
    boundary then saves and stops; see `cratemae.distributed.preemption`), joins the launch
    (torchrun, srun or a single process), seeds torch (`run.seed`, plus the rank with
    `seed_per_rank`: different masks per rank; without it every rank draws the same new
    head), and finds the checkpoint to resume from (`resume`: see
    `cratemae.checkpoints.Resume`; None: the task never resumes). Leaving ends the
    process group. Nothing is written until `open_run_dir()`.

    With a `source` (the checkpoint the run starts from) and its `result` file, a run
    directory that holds the run of other weights is refused (exit 2, naming both), before
    the launch: a resume there would report the other checkpoint's result. With
    `overwrite`, that run is replaced instead: a fresh start, and once the directory is
    locked its checkpoints, best weights and result go."""

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, *,
                 resume: Resume | None = Resume.AUTO, seed_per_rank: bool = False,
                 source: Source | None = None, result: Path | None = None,
                 overwrite: bool = False) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.run.out_dir)
        self.files = RunFiles(self.run_dir)
        self.resume = resume
        self.seed_per_rank = seed_per_rank
        self.resume_from: Path | None = None
        self.source, self.result, self.overwrite = source, result, overwrite
        self.replacing: str | None = None  # whose run `overwrite` replaces

    def __enter__(self) -> RunSetup:
        run = self.recipe.run
        if self.source is not None:  # every rank reads before any can pass the launch
            self.replacing = self._claim(self.source)
        self.preempt = PreemptionFlag().__enter__()  # a stop during start-up counts too
        try:
            self.info = dist.init_distributed(run.master_addr, run.master_port)
        except BaseException:
            self.preempt.__exit__()
            raise
        try:
            torch.manual_seed(run.seed + (self.info.rank if self.seed_per_rank else 0))
            self.resume_from = self._resume_point()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _resume_point(self) -> Path | None:
        """The checkpoint to continue from: none when the task never resumes or replaces
        another run (unless resumed from a named path), else `find_resume`'s."""
        fresh = self.replacing is not None and (
            self.resume is None or self.resume.mode != "path")
        if self.resume is None or fresh:
            return None
        return find_resume(self.run_dir, self.resume)

    def decide_resume(self) -> Path | None:
        """What entering decides about the run directory, without the launch, the seed or
        the stop signals (`--dry-run`): the claim on it (with a `source`), then the
        checkpoint to continue from (None: a fresh start)."""
        if self.source is not None:
            self.replacing = self._claim(self.source)
        return self._resume_point()

    def _claim(self, source: Source) -> str | None:
        """None when the run directory is free or holds a run of `source`'s weights; the
        other run's checkpoint when `overwrite` lets this run replace it; else refused."""
        try:
            recorded = recorded_source(self.run_dir, self.result)
        except BadInputError as err:
            if not self.overwrite or self._kind_here() != self._my_kind():
                raise BadInputError(f"{err}: cannot tell which checkpoint the run in "
                                    f"{self.run_dir} belongs to; give another --out"
                                    + ("" if self.overwrite else ", or --overwrite to "
                                       "replace it")) from None
            return str(err)
        if recorded is None or source.same_as(recorded):
            return None
        other = Source(str(recorded.get("checkpoint") or "?"),
                       recorded.get("checkpoint_sha256"))
        if not recorded:
            what = "a run that records no checkpoint (a pre-training run, or an older one)"
        else:
            what = f"the run of {other.describe()}"
        kind = self._kind_here()
        if kind != self._my_kind():  # --overwrite never removes another kind of run
            raise BadInputError(
                f"{self.run_dir} holds {what} ({kind}), not a {self._my_kind()} of "
                f"{source.describe()}: --overwrite replaces only a {self._my_kind()}'s "
                f"results; give another --out")
        if not self.overwrite:
            raise BadInputError(
                f"{self.run_dir} holds {what}, not of {source.describe()}: give another "
                f"--out, or --overwrite to replace it")
        return what

    def _my_kind(self) -> str:
        """'probe' or 'fine-tune': the kind of run this one is (by its result file)."""
        return "probe" if self.result == self.files.probe else "fine-tune"

    def _kind_here(self) -> str:
        """The kind of the run already in the run directory, as `cratemae runs` reads it
        ("pre-train", "fine-tune", "probe"; "unknown" when it cannot be read)."""
        from cratemae.train.runs import describe_run

        try:
            return describe_run(self.run_dir).kind
        except Exception:  # a damaged record: its result file's name or log may still say
            if self.result is not None and self.result.exists():
                return self._my_kind()
        log_file_ = self.files.log
        if special_kind(log_file_) is None and log_file_.is_file():
            with open(log_file_, encoding="utf-8", errors="replace") as f:
                head = f.read(20000)
            for kind, marker in (("fine-tune", " fine-tuning "), ("probe", " probing ")):
                if marker in head:
                    return kind
        return "unknown"

    def _clear_replaced(self) -> None:
        """Remove what the replaced run left that this one would mix with (rank 0, locked)."""
        log.warning("replacing %s in %s (--overwrite)", self.replacing, self.run_dir)
        for folder in (self.files.checkpoints, self.files.best, self.files.tensorboard):
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)
            elif folder.is_symlink():
                folder.unlink()
        for file in (self.result, self.files.metrics, self.files.log):
            if file is not None and (file.is_file() or file.is_symlink()):
                file.unlink()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            dist.destroy_distributed()
        finally:
            self.preempt.__exit__()

    @contextmanager
    def open_run_dir(self) -> Iterator[Path]:
        """Create the run directory, lock it (one run per directory: a second one is refused
        naming the holder, see `cratemae.train.lock`) and write the resolved recipe (rank 0),
        and copy the log lines into its log.txt while the block runs. status.json says
        "running" during the block, then "finished", "stopped" (a stop signal or Ctrl-C:
        resumable) or "failed" with the error (`cratemae runs` reads it)."""
        with ExitStack() as stack:
            error = None
            if dist.is_main_process():
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    stack.enter_context(RunLock(self.run_dir))
                except (BadInputError, OSError) as err:
                    error = (err if isinstance(err, BadInputError) else
                             BadInputError(f"{self.run_dir}: cannot write the run here ({err})"))
            dist.raise_together(error, f"{self.run_dir}: rank 0 cannot write the run there")
            if dist.is_main_process():
                if self.replacing is not None:
                    self._clear_replaced()
                atomic_write_text(self.files.recipe, dump_recipe(self.recipe))
            stack.enter_context(log_file(self.files.log if dist.is_main_process() else None))
            self._status("running")
            try:
                yield self.run_dir
            except KeyboardInterrupt:
                self._status("stopped")
                raise
            except Exception as err:
                if isinstance(err, CrateMAEError) and err.exit_code == EXIT_REQUEUE:
                    self._status("stopped")
                else:
                    self._status("failed", error=f"{type(err).__name__}: {err}"[:1000])
                raise
            self._status("finished")

    def _status(self, state: str, **fields: str) -> None:
        if dist.is_main_process():
            source = self.source.fields() if self.source is not None else {}
            write_status(self.run_dir, state, **source, **fields)
