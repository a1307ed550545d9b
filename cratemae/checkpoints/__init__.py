"""Checkpoints: atomic, verified save/load of weights, optimizer, scaler and RNG states.

Plain `dict[str, Tensor]` and JSON in, safetensors + JSON on disk (never pickle), so a
checkpoint can be inspected, and loaded without executing anything. See `store` for the
on-disk layout and the crash-safety argument.

May import: errors.
"""

from cratemae.checkpoints.load import (
    Checkpoint,
    load_checkpoint,
    read_model_weights,
    write_model_weights,
)
from cratemae.checkpoints.resolve import Resume, find_resume
from cratemae.checkpoints.retention import completed_epoch, prune_checkpoints
from cratemae.checkpoints.rng import (
    collect_rng_state,
    pack_rng_state,
    restore_rng_state,
    unpack_rng_state,
)
from cratemae.checkpoints.state_dict import check_state_dict_matches, strip_wrapper_prefixes
from cratemae.checkpoints.store import REQUIRED_META, save_checkpoint
from cratemae.checkpoints.tree import flatten_tree, unflatten_tree

__all__ = [
    "REQUIRED_META",
    "Checkpoint",
    "Resume",
    "check_state_dict_matches",
    "collect_rng_state",
    "completed_epoch",
    "find_resume",
    "flatten_tree",
    "load_checkpoint",
    "pack_rng_state",
    "prune_checkpoints",
    "read_model_weights",
    "restore_rng_state",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "unflatten_tree",
    "unpack_rng_state",
    "write_model_weights",
]
