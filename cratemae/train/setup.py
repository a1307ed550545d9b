"""Setting up a run, the same for every task: the launch, the seed, where to resume from, and
the run directory (the resolved recipe, the log file and status.json).

    with RunSetup(recipe, run_dir, resume=Resume.AUTO) as run:  # group, seed, resume
        task = ...                                   # bad input stops here, unwritten
        with run.open_run_dir():                     # recipe.toml, log.txt, status.json
            Trainer(run, task).fit()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType

import torch

from cratemae.checkpoints import Resume, find_resume
from cratemae.distributed import dist
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.fs import atomic_write_text
from cratemae.recipe import Recipe, dump_recipe
from cratemae.rundir import RunFiles
from cratemae.train.lock import RunLock
from cratemae.train.run_dir import log_file, write_status

__all__ = ["RunSetup"]


class RunSetup:
    """Entering starts listening for the stop signals (SIGTERM, SIGUSR1: the first step
    boundary then saves and stops; see `cratemae.distributed.preemption`), joins the launch
    (torchrun, srun or a single process), seeds torch (`run.seed`, plus the rank with
    `seed_per_rank`: different masks per rank; without it every rank draws the same new
    head), and finds the checkpoint to resume from (`resume`: see
    `cratemae.checkpoints.Resume`; None: the task never resumes). Leaving ends the
    process group. Nothing is written until `open_run_dir()`."""

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, *,
                 resume: Resume | None = Resume.AUTO,
                 seed_per_rank: bool = False) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.run.out_dir)
        self.files = RunFiles(self.run_dir)
        self.resume = resume
        self.seed_per_rank = seed_per_rank
        self.resume_from: Path | None = None

    def __enter__(self) -> RunSetup:
        run = self.recipe.run
        self.preempt = PreemptionFlag().__enter__()  # a stop during start-up counts too
        try:
            self.info = dist.init_distributed(run.master_addr, run.master_port)
        except BaseException:
            self.preempt.__exit__()
            raise
        try:
            torch.manual_seed(run.seed + (self.info.rank if self.seed_per_rank else 0))
            if self.resume is not None:
                self.resume_from = find_resume(self.run_dir, self.resume)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

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
            write_status(self.run_dir, state, **fields)
