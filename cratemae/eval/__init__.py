"""Evaluation: feature extraction and its cache, logistic regression, classification
metrics and labels, and the measures of pre-training's validation (`validation`: the
seeded subset and its loss; `knn`: the k-NN vote), which `cratemae.tasks.monitor` runs.

May import: errors, recipe, data, model, checkpoints, distributed.
"""

__all__: list[str] = []
