"""Weights in and out: loading any checkpoint for inference, exporting safetensors and ONNX,
importing the authors' released checkpoint, and the timm model registration."""

__all__: list[str] = []
