"""Pictures of what a model does: masked-image reconstructions.

May import: errors, recipe, data, model, weights.
"""

__all__: list[str] = []
