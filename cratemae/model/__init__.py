"""The CRATE-MAE model: layers named after the paper, the encoder, the autoencoder, its
configuration and presets. Pure PyTorch: no file or terminal I/O.

May import: nothing else of cratemae.
"""

from cratemae.model.authors import authors_to_cratemae, load_authors_state_dict
from cratemae.model.config import PRESETS, CrateMAEConfig
from cratemae.model.crate_mae import CrateMAE, MAEOutput
from cratemae.model.encoder import CrateEncoder
from cratemae.model.factory import create_model, preset_config
from cratemae.model.layers import ISTA, MSSA, DecoderLayer, EncoderLayer
from cratemae.model.masking import random_masking
from cratemae.model.patches import masked_patch_loss, patchify, unpatchify

__all__ = [
    "ISTA",
    "MSSA",
    "PRESETS",
    "CrateEncoder",
    "CrateMAE",
    "CrateMAEConfig",
    "DecoderLayer",
    "EncoderLayer",
    "MAEOutput",
    "authors_to_cratemae",
    "create_model",
    "load_authors_state_dict",
    "masked_patch_loss",
    "patchify",
    "preset_config",
    "random_masking",
    "unpatchify",
]
