"""The three tasks on the training loop: pre-training, fine-tuning and linear probing.
One task never imports another; what two share lives below them (train, eval, weights).

May import: errors, recipe, data, model, checkpoints, distributed, train, eval, weights, analysis, viz.
"""  # noqa: E501

__all__: list[str] = []
