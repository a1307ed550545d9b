"""Pictures of what a model does: masked-image reconstructions."""

__all__: list[str] = []
