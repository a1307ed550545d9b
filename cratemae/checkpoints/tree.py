"""Split a nested Python object into its tensors and a JSON skeleton, and join them back.

Optimizer and scaler states are trees of dicts/lists/tuples holding tensors, numbers, strings,
bools and None. safetensors stores only a flat `dict[str, Tensor]` plus string metadata, so the
tensors go into the file under generated keys and everything else becomes a JSON skeleton that
records *exactly* what was there. Plain JSON would lose information that matters on resume:
tuples would come back as lists, int dict keys (optimizer `state` is keyed by parameter index)
would come back as strings, and NaN/inf would not be valid JSON. So every container is tagged:

    {"dict": [[key_node, value_node], ...]}   keys of any JSON-able scalar type, order kept
    {"list": [...]}, {"tuple": [...]}
    {"tensor": "<key in the tensor dict>"}
    {"float": "nan" | "inf" | "-inf"}         finite floats stay JSON numbers (repr is exact)

A bare JSON dict therefore never appears in a skeleton, which keeps decoding unambiguous.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["flatten_tree", "unflatten_tree"]

_SCALARS = (str, int, float, bool, type(None))


def flatten_tree(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Return `(tensors, skeleton)`: the tensors under keys `prefix + "0"`, `"1"`, ... and the
    JSON-able skeleton that `unflatten_tree` needs to rebuild `obj`.

    Tensors are detached, moved to CPU and made contiguous (safetensors requires it); their
    dtype and shape are kept. Raises TypeError, naming the path, for an unsupported value.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, prefix, "<root>")
    return tensors, skeleton


def unflatten_tree(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild the object that `flatten_tree` split into `tensors` and `skeleton`.

    Raises ValueError if the skeleton is malformed or names a tensor that is not there.
    """
    return _decode(skeleton, tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, path: str) -> Any:
    # bool before int/float: bool is a subclass of int and JSON keeps true/false distinct.
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, _SCALARS):
                raise TypeError(f"{path}: dict key {k!r} of type {type(k).__name__} unsupported")
            items.append(
                [_encode(k, tensors, prefix, path), _encode(v, tensors, prefix, f"{path}.{k}")]
            )
        return {"dict": items}
    if isinstance(obj, (list, tuple)):
        tag = "tuple" if isinstance(obj, tuple) else "list"
        return {tag: [_encode(v, tensors, prefix, f"{path}[{i}]") for i, v in enumerate(obj)]}
    raise TypeError(f"{path}: cannot store a value of type {type(obj).__name__} in a checkpoint")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"malformed skeleton node {str(node)[:80]!r}")
    ((tag, body),) = node.items()
    if tag == "tensor":
        if body not in tensors:
            raise ValueError(f"skeleton names tensor {body!r}, which is not in the file")
        return tensors[body]
    if tag == "float":
        if body not in ("nan", "inf", "-inf"):
            raise ValueError(f"malformed float node {body!r}")
        return float(body)
    if tag == "list":
        return [_decode(v, tensors) for v in body]
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    raise ValueError(f"unknown skeleton tag {tag!r}")
