"""Evaluation: feature extraction and its cache, logistic regression, classification
metrics and labels.

May import: errors, recipe, data, model, checkpoints, distributed.
"""

__all__: list[str] = []
