"""Weights in and out: the one loader every command uses (with the one key mapper for every
layout), export to safetensors, ONNX and torch.export, the authors' file format, timm's
registration.

May import: errors, recipe, model, checkpoints.
"""

__all__: list[str] = []
