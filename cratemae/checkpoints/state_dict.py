"""Check a state dict against a model before loading, so a mismatch never loads half.

`nn.Module.load_state_dict(strict=True)` reports mismatched keys only after copying what did
match; with a shape mismatch it raises mid-way. Checking first keeps the model untouched and
gives one readable line that names the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from cratemae.errors import BadInputError

__all__ = ["check_finite", "check_state_dict_matches", "first_nonfinite", "strip_wrapper_prefixes"]

# `module.` comes from DistributedDataParallel / DataParallel, `_orig_mod.` from torch.compile.
_LEADING = ("module.", "_orig_mod.")
_SHOW = 5


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without wrapper prefixes: leading `module.`/`_orig_mod.` (in any nesting) and
    `_orig_mod.` segments inside keys (a compiled submodule). Order is kept.

    Raises BadInputError if two keys become the same (a state dict mixing wrapped and
    unwrapped names cannot be interpreted).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _strip(key)
        if new in out:
            raise BadInputError(f"state dict has both wrapped and unwrapped copies of {new!r}")
        out[new] = value
    return out


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    while "._orig_mod." in key:
        key = key.replace("._orig_mod.", ".")
    return key


def check_state_dict_matches(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Raise BadInputError naming `source` if `state` does not fit `model` exactly: missing
    keys, unexpected keys and shape mismatches (the first few of each).

    Wrapper prefixes are ignored on both sides. Returns `state` with prefixes stripped, ready
    for `load_state_dict` on the *unwrapped* model.
    """
    state = strip_wrapper_prefixes(state)
    expected = {k: tuple(v.shape) for k, v in strip_wrapper_prefixes(model.state_dict()).items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(shape)})"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems = [
        _describe(missing, "missing key"),
        _describe(unexpected, "unexpected key"),
        _describe(shapes, "shape mismatch", plural="shape mismatches"),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise BadInputError(f"{source}: does not match the model: {'; '.join(problems)}")
    return state


def _describe(items: list[str], noun: str, plural: str | None = None) -> str:
    if not items:
        return ""
    name = noun if len(items) == 1 else (plural or noun + "s")
    shown = ", ".join(items[:_SHOW]) + (
        f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    )
    return f"{len(items)} {name}: {shown}"


def first_nonfinite(tensors: dict[str, Any]) -> tuple[str, int] | None:
    """`(key, count)` of the first floating-point tensor (in order, nested dicts and lists
    walked with dotted keys) holding NaN or inf, and how many such values it holds; None
    when all are finite. Integer tensors are finite by nature; -0.0 and subnormals are
    finite."""
    for key, value in tensors.items():
        if isinstance(value, dict):
            found = first_nonfinite({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            found = first_nonfinite({f"{key}.{i}": v for i, v in enumerate(value)})
        elif torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
            bad = value.numel() - int(torch.isfinite(value).sum()) if value.numel() else 0
            found = (key, bad) if bad else None
        else:
            found = None
        if found is not None:
            return found
    return None


def check_finite(tensors: dict[str, Any], source: str, what: str = "weights") -> None:
    """BadInputError naming `source` and the first tensor of `tensors` that holds NaN or
    inf: weights that diverged must never pass as a model (every result computed from them
    would be NaN, or silently wrong)."""
    found = first_nonfinite(tensors)
    if found is not None:
        key, bad = found
        raise BadInputError(
            f"{source}: its {what} hold NaN or inf ({bad} value(s) of tensor {key!r}, the "
            f"first such tensor): the run diverged before this was saved; use an earlier "
            f"checkpoint")
