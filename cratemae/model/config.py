"""The model's only input: a frozen configuration, the four published CRATE-MAE presets and
MAE's ViT baselines."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PRESETS", "CrateMAEConfig"]

# Bounds of a field, in its metadata: checked here, and turned into the recipe's validation
# (`cratemae.recipe.schema.ModelSection` is derived from this class). The upper bounds are far
# above any real model: they are there so that a typo (depth = 100000000) is refused at once
# instead of hanging the machine while the weights are allocated.
POSITIVE = {"gt": 0}


def _size(limit: int) -> dict[str, int]:
    return {"gt": 0, "le": limit}


MAX_DEPTH = _size(1024)
MAX_WIDTH = _size(65536)
MAX_HEADS = _size(4096)
MAX_IMG = _size(8192)
# Tokens per image: 8192 px at patch 1 passes both bounds above but makes 67M tokens, whose
# position table alone would fill the machine. 2**20 is a 1024 x 1024 grid.
MAX_PATCHES = 2**20
# Weights of the whole model, estimated as a ViT's (12 d^2 a block, encoder and decoder): each
# size may be within its bound and the whole still far beyond any machine (width 65,536 is
# 52 G parameters a block). 2e10 is 80 GB in float32, 65 times CRATE-MAE-Large.
MAX_PARAMS = 2 * 10**10


@dataclass(frozen=True, kw_only=True)
class CrateMAEConfig:
    """Shape and hyper-parameters of a CRATE-MAE model, or of MAE's ViT (`family="vit"`).

    Args:
        family: "crate" (CRATE-MAE: MSSA + ISTA layers) or "vit" (MAE's ViT baseline:
            timm's pre-norm attention + MLP blocks, He et al. 2022). Configurations saved
            before this field existed are "crate".
        img_size: Training image size in pixels (square).
        patch_size: Side of a square patch in pixels.
        in_chans: Image channels.
        embed_dim: Token width d of the encoder.
        depth: Number of encoder layers (MSSA + ISTA).
        num_heads: Number of MSSA heads K in the encoder; each subspace has d/K dimensions.
        decoder_embed_dim: Token width of the decoder. For "crate" it must equal
            `embed_dim`: the decoder inverts the encoder layer by layer and takes the latent
            as it is. For "vit" it may differ: a linear map takes the latent to it.
        decoder_depth: Number of decoder layers (linear map, minus MSSA).
        decoder_num_heads: Number of MSSA heads in the decoder.
        norm_pix_loss: Standardise each target patch by its own mean and variance.
        ista_step_size: eta, the ISTA step size ("crate" only; ignored for "vit").
        ista_lambda: lambda, the sparsity penalty of the ISTA step ("crate" only; ignored
            for "vit").
        encoder_visible_only: MAE-style encoder on the kept tokens only (plus CLS). About 4x
            fewer encoder tokens at mask ratio 0.75, but a different model from the
            authors', whose encoder sees mask tokens in every removed position. Must be
            True for "vit": MAE's encoder never sees mask tokens.
        mlp_ratio: Hidden width of the MLP over the token width ("vit" only; ignored for
            "crate").
    """

    img_size: int = field(default=224, metadata=MAX_IMG)
    patch_size: int = field(default=16, metadata=MAX_IMG)
    in_chans: int = field(default=3, metadata=_size(1024))
    embed_dim: int = field(default=768, metadata=MAX_WIDTH)
    depth: int = field(default=12, metadata=MAX_DEPTH)
    num_heads: int = field(default=12, metadata=MAX_HEADS)
    decoder_embed_dim: int = field(default=768, metadata=MAX_WIDTH)
    decoder_depth: int = field(default=12, metadata=MAX_DEPTH)
    decoder_num_heads: int = field(default=12, metadata=MAX_HEADS)
    norm_pix_loss: bool = False
    ista_step_size: float = field(default=0.1, metadata=POSITIVE)
    ista_lambda: float = field(default=0.5, metadata={"ge": 0})
    encoder_visible_only: bool = False
    family: Literal["crate", "vit"] = "crate"
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0, "le": 1024})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value}")
            if "gt" in f.metadata and not value > f.metadata["gt"]:
                raise ValueError(f"{f.name} must be positive, got {value}"
                                 if f.metadata["gt"] == 0 else
                                 f"{f.name} must be above {f.metadata['gt']}, got {value}")
            if "ge" in f.metadata and not value >= f.metadata["ge"]:
                raise ValueError(f"{f.name} must be at least {f.metadata['ge']}, got {value}")
            if "le" in f.metadata and not value <= f.metadata["le"]:
                raise ValueError(f"{f.name} must be at most {f.metadata['le']}, got {value}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_patches > MAX_PATCHES:
            raise ValueError(
                f"img_size {self.img_size} at patch_size {self.patch_size} makes "
                f"{self.num_patches} patches an image, over {MAX_PATCHES}"
            )
        if self.approx_params > MAX_PARAMS:
            raise ValueError(
                f"embed_dim {self.embed_dim}, depth {self.depth}, decoder_embed_dim "
                f"{self.decoder_embed_dim}, decoder_depth {self.decoder_depth} make about "
                f"{self.approx_params:.2g} parameters, over {MAX_PARAMS:.0e}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.family not in ("crate", "vit"):
            raise ValueError(f"family must be 'crate' or 'vit', got {self.family!r}")
        if self.family == "vit" and not self.encoder_visible_only:
            raise ValueError("family 'vit' (MAE's ViT) needs encoder_visible_only = true: "
                             "MAE's encoder sees only the kept patches, never mask tokens")
        if self.family == "crate" and self.decoder_embed_dim != self.embed_dim:
            raise ValueError(
                f"decoder_embed_dim ({self.decoder_embed_dim}) must equal embed_dim "
                f"({self.embed_dim}): the CRATE-MAE decoder takes the latent as it is"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side at the training size."""
        return self.img_size // self.patch_size

    @property
    def approx_params(self) -> int:
        """A ViT's count for these sizes (12 d^2 a block, encoder and decoder): an upper
        estimate of CRATE's, whose blocks share their attention projections."""
        return 12 * (self.depth * self.embed_dim**2
                     + self.decoder_depth * self.decoder_embed_dim**2)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CrateMAEConfig:
        """Build from a dict; unknown keys are an error, so a typo never passes silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CrateMAEConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def _preset(dim: int, heads: int, depth: int) -> dict[str, Any]:
    # Decoder width, heads and depth equal the encoder's in every published size.
    return dict(
        embed_dim=dim,
        num_heads=heads,
        depth=depth,
        decoder_embed_dim=dim,
        decoder_num_heads=heads,
        decoder_depth=depth,
        img_size=224,
        patch_size=16,
    )


def _vit_preset(dim: int, heads: int, depth: int, decoder: tuple[int, int, int]
                ) -> dict[str, Any]:
    # MAE's ViT: the encoder sees the kept patches only; the decoder is (width, heads, depth).
    return dict(
        family="vit",
        encoder_visible_only=True,
        embed_dim=dim,
        num_heads=heads,
        depth=depth,
        decoder_embed_dim=decoder[0],
        decoder_num_heads=decoder[1],
        decoder_depth=decoder[2],
        mlp_ratio=4.0,
        img_size=224,
        patch_size=16,
    )


# MAE's released decoder (512 wide, 16 heads, 8 blocks) for base and large. Tiny and small
# were not released with MAE: they get a decoder scaled down with them, 256 wide, 8 heads,
# 4 blocks (our choice).
_MAE_DECODER = (512, 16, 8)
_SMALL_DECODER = (256, 8, 4)

PRESETS: dict[str, dict[str, Any]] = {
    "crate_mae_tiny": _preset(384, 6, 12),
    "crate_mae_small": _preset(576, 12, 12),
    "crate_mae_base": _preset(768, 12, 12),
    "crate_mae_large": _preset(1024, 16, 24),
    "mae_vit_tiny": _vit_preset(192, 3, 12, _SMALL_DECODER),
    "mae_vit_small": _vit_preset(384, 6, 12, _SMALL_DECODER),
    "mae_vit_base": _vit_preset(768, 12, 12, _MAE_DECODER),
    "mae_vit_large": _vit_preset(1024, 16, 24, _MAE_DECODER),
}
