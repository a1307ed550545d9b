"""The training loop: the trainer, the optimizer and its schedule, the weight average, the
best-keeping, the run directory and the state that makes a run resumable. The tasks
(`cratemae.tasks`) run on it.

May import: errors, recipe, data, model, checkpoints, distributed.
"""

__all__: list[str] = []
