"""Read the authors' released weights and build the cratemae model they describe.

Three kinds of file hold weights in the authors' key layout (Ma-Lab-Berkeley/CRATE,
`model/crate_ae/`):
- MAE's `.pth` checkpoint: a dict whose `model` entry is the state dict, beside
  `optimizer`, `epoch`, `scaler` and an `argparse.Namespace` in `args`;
- a bare state dict saved with `torch.save`;
- a safetensors file, its tensors named as theirs or under `model.` (other prefixes, such as
  the reference vectors' `io.`, are left out), with an optional JSON `config` metadata key.

Pickles are read with `torch.load(weights_only=True)`, allowing `argparse.Namespace` only;
a file that needs any other global is refused with the list of what it asks for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cratemae.checkpoints import check_state_dict_matches
from cratemae.checkpoints.state_dict import check_finite
from cratemae.errors import BadInputError
from cratemae.guard import regular_file
from cratemae.model import CrateMAE, CrateMAEConfig, preset_config
from cratemae.weights.load import check_fits, checkpoint_filter_fn

__all__ = ["AuthorsWeights", "build_authors_model", "read_authors_file"]

_ALLOWED_GLOBALS = [argparse.Namespace]
_FIELDS = {f.name for f in dataclasses.fields(CrateMAEConfig)}


@dataclass(frozen=True)
class AuthorsWeights:
    """A state dict in the authors' layout and the configuration the file records."""

    state: dict[str, torch.Tensor]
    recorded: dict[str, Any] = field(default_factory=dict)  # CrateMAEConfig fields only
    kind: str = "state dict"


def _read_pickle(path: Path) -> Any:
    """torch.load with weights_only=True, allowing argparse.Namespace only. What the file
    asks for is listed first, so a refusal can name it."""
    try:
        asked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive: torch.load below says what is wrong
        asked = []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _ALLOWED_GLOBALS}
    refused = sorted(set(asked) - allowed)
    if refused:
        raise _refusal(path, refused)
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file fails in many ways inside torch.load
        # Files in the legacy (non-zip) format can only be asked by loading them, and the
        # refusal names the global deep in its message.
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        if wanted:
            raise _refusal(path, [wanted.group(1)]) from None
        unsafe = sorted(set(_legacy_globals(path)) - allowed - _torch_allowed())
        if unsafe:  # protocol 4: torch stops at its FRAME opcode, before naming the global
            raise _refusal(path, unsafe) from None
        raise BadInputError(f"{path}: not a loadable PyTorch checkpoint ({_short(err)})") from None


def _legacy_globals(path: Path) -> list[str]:
    """The globals a plain (not zip) pickle asks for, from its opcodes (`pickletools`
    decodes them and runs nothing): GLOBAL's argument, or the last two strings before a
    STACK_GLOBAL (protocol 4). A file that is no pickle gives what was found before it
    broke off."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
    except Exception:  # not a pickle, or a damaged one: torch.load says what is wrong
        pass
    return found


def _torch_allowed() -> set[str]:
    """The globals torch's weights-only reader takes (tensors, storages, OrderedDict)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # another torch: name every global the file asks for
        return set()


def _refusal(path: Path, names: list[str]) -> BadInputError:
    return BadInputError(
        f"{path}: refused: the file asks to load {', '.join(names)}; only "
        "argparse.Namespace is allowed (weights_only=True, no unsafe fallback)"
    )


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _from_args(args: Any) -> dict[str, Any]:
    """The fields MAE's command line arguments record: input size and norm_pix_loss."""
    recorded: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        if isinstance(getattr(args, "input_size", None), int):
            recorded["img_size"] = args.input_size
        if isinstance(getattr(args, "norm_pix_loss", None), bool):
            recorded["norm_pix_loss"] = args.norm_pix_loss
    return recorded


def _tensors_only(state: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise BadInputError(f"{path}: {what} is not a non-empty state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise BadInputError(f"{path}: {what} holds non-tensor entries: {bad[:5]}")
    return state


def _read_safetensors(path: Path) -> AuthorsWeights:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        config = json.loads(metadata["config"]) if "config" in metadata else {}
    except Exception as err:  # safetensors' own error types, JSON errors
        raise BadInputError(f"{path}: not a readable safetensors file ({_short(err)})") from None
    if any(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    recorded = {k: v for k, v in config.items() if k in _FIELDS} if isinstance(config, dict) else {}
    return AuthorsWeights(_tensors_only(tensors, path, "the file"), recorded, "safetensors")


def read_authors_file(path: str | os.PathLike[str]) -> AuthorsWeights:
    """Read any of the three kinds of file (see the module docstring)."""
    path = regular_file(path)  # a FIFO, socket or device: refused, never opened
    if not path.is_file():
        raise BadInputError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _read_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # MAE's checkpoint
        state = _tensors_only(obj["model"], path, "its 'model' entry")
        return AuthorsWeights(state, _from_args(obj.get("args")), "MAE checkpoint")
    return AuthorsWeights(_tensors_only(obj, path, "the file"), {}, "state dict")


def _from_shapes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensors themselves say: widths, depths, patch and image size."""
    found: dict[str, Any] = {}
    if "patch_embed.proj.weight" in state:
        d, c, p, _ = state["patch_embed.proj.weight"].shape  # (d, C, p, p)
        found.update(embed_dim=d, decoder_embed_dim=d, in_chans=c, patch_size=p)
        if "pos_embed" in state:  # (1, 1 + L, d): a square grid of L patches
            grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
            found["img_size"] = grid * p
    for prefix, key in (("blocks.", "depth"), ("decoder_blocks.", "decoder_depth")):
        layers = {k.split(".")[1] for k in state if k.startswith(prefix)}
        if layers:
            found[key] = len(layers)
    return found


def build_authors_model(
    weights: AuthorsWeights, path: Path, *, preset: str, overrides: dict[str, Any]
) -> CrateMAE:
    """The model the weights fit, loaded with them. The configuration is the preset's,
    then what the tensors' shapes say, then what the file records, then `overrides`."""
    shapes = _from_shapes(weights.state)
    try:
        base = preset_config(preset).to_dict()
        values = {**base, **shapes, **weights.recorded, **overrides}
        if "num_heads" not in {**weights.recorded, **overrides} and (
            values["embed_dim"] != base["embed_dim"]
        ):
            raise ValueError(
                f"the weights are {values['embed_dim']} wide but {preset} is "
                f"{base['embed_dim']}: give --num-heads, or the --preset of that width"
            )
        config = CrateMAEConfig.from_dict(values)
    except ValueError as err:
        raise BadInputError(f"{path}: {err}") from None
    # What the file records may say any size: checked against the tensors on the `meta`
    # device first, and the values checked finite, before a model is built for real.
    check_fits(config, weights.state, str(path), CrateMAE)
    check_finite(weights.state, str(path))
    model = CrateMAE(config)
    # The one key mapper translates their names (a key of no known kind is refused there);
    # then short, counted lists of what is missing or mis-shaped, before anything is copied.
    state = checkpoint_filter_fn(weights.state, model, str(path))
    model.load_state_dict(check_state_dict_matches(model, state, str(path)), strict=True)
    return model.eval()
