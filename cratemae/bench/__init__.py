"""Benchmarks: the training step of the loop, timed after a check against the reference,
and the data pipeline's throughput.

May import: errors, recipe, data, model, distributed, train, tasks.
"""

__all__: list[str] = []
