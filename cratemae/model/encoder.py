"""The CRATE encoder on its own: a classifier backbone that meets timm's model contract.

What timm's `VisionTransformer` offers, this offers the same way: `num_features`,
`head_hidden_size`, `embed_dim`, `num_prefix_tokens` and `feature_info` (one entry per
layer); `forward_intermediates` / `prune_intermediate_layers` (so `features_only=True`
works through timm's feature getter); `set_grad_checkpointing`; `dynamic_img_size`;
stochastic depth (`drop_path_rate`); and it compiles with `torch.jit.script` and traces with
`torch.fx.symbolic_trace` (and timm's fx-then-script). The two functions that look at the
input's size (`_checked_images`, `_positions`) are leaves for torch.fx, so a traced graph
still runs the eager checks on the real tensor instead of baking one size in. Any size
that is a multiple of the patch size goes through every path: in eager PyTorch the authors'
position table is cached per grid size; scripted, traced (ONNX) or exported (torch.export),
the graph computes it from the size it is given (`sincos_2d_torch`).
"""

# No `from __future__ import annotations` here: torch.fx writes the annotation of `forward`'s
# argument into the code of its graph, and TorchScript cannot read a string there (timm's
# fx-then-script test failed with "Unknown type name '_torch_Tensor_'").
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from cratemae.model.config import CrateMAEConfig
from cratemae.model.layers import DropPath, EncoderLayer, PatchEmbed
from cratemae.model.pos_embed import sincos_2d, sincos_2d_torch

__all__ = ["CrateEncoder"]

FINAL_NORM_EPS = 1e-6
POOLS = ("token", "avg", "")  # "": no pooling, the token sequence (timm's convention)


def _checked_images(imgs: torch.Tensor, patch_size: int, img_size: int, strict: bool
                    ) -> torch.Tensor:
    """`imgs` itself, after the checks a user needs: 4-D, sides a multiple of the patch
    size, and with `strict` (dynamic_img_size=False) exactly the training size."""
    if imgs.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got {imgs.dim()} dimensions")
    h, w = imgs.shape[-2], imgs.shape[-1]
    if strict and (h != img_size or w != img_size):
        raise ValueError(f"image size ({h}, {w}) differs from the model's {img_size} px; "
                         "build it with dynamic_img_size=True for other sizes")
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size ({h}, {w}) is not a multiple of {patch_size}")
    if torch.jit.is_tracing():
        # ONNX has no assertion: a graph traced for every size refuses a side that is not a
        # multiple of the patch size with this reshape, which only whole patches fit.
        b, c = imgs.shape[0], imgs.shape[1]
        whole = imgs.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
        imgs = whole.reshape(b, c, h, w)
    return imgs


def _positions(imgs: torch.Tensor, table: torch.Tensor, patch_size: int, grid_size: int
               ) -> torch.Tensor:
    """The position table (1, 1+L, d) for the patch grid of `imgs`."""
    grid_h, grid_w = imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size
    return _grid_positions(table, grid_h, grid_w, grid_size)


def _grid_positions(table: torch.Tensor, grid_h: int, grid_w: int, grid_size: int
                    ) -> torch.Tensor:
    """The table (1, 1 + grid_h*grid_w, d) for a grid, in `table`'s dtype and device.

    Eager: `table` (the stored one) at the training grid, else the authors' numpy table
    for that grid, made once per grid size. In a graph, `sincos_2d_torch`: under tracing
    (ONNX) and torch.export the sizes are the input's, not numbers, so it is computed from
    them with no branch on them; scripted or compiled, at grids other than the training one.
    """
    if torch.jit.is_scripting():
        if grid_h == grid_size and grid_w == grid_size:
            return table
        return _computed_table(table, grid_h, grid_w)
    else:  # TorchScript compiles only the scripting branch of this `if`
        symbolic = (torch.jit.is_tracing() or torch.compiler.is_exporting()
                    or isinstance(grid_h, torch.SymInt) or isinstance(grid_w, torch.SymInt))
        if not symbolic and grid_h == grid_size and grid_w == grid_size:
            return table
        if symbolic or torch.compiler.is_compiling():
            return _computed_table(table, grid_h, grid_w)
        return _cached_table(table.shape[-1], grid_h, grid_w, table.device, table.dtype)


def _computed_table(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """`sincos_2d_torch` as `table`'s (1, 1+L, d), dtype and device: the graphs' table."""
    return sincos_2d_torch(table.shape[-1], grid_h, grid_w, table.device)[None].to(table.dtype)


@functools.lru_cache(maxsize=32)
def _cached_table(dim: int, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype
                  ) -> torch.Tensor:
    """`sincos_2d` for a grid, (1, 1+L, d), made once per grid, width, device and dtype: no
    cost per step at another image size. A plain tensor even if first asked for under
    `torch.inference_mode`, so that training may use it afterwards."""
    with torch.inference_mode(False), torch.no_grad():
        return sincos_2d(dim, grid_h, grid_w)[None].to(device=device, dtype=dtype)


# Leaves of a torch.fx graph: called with the real tensor when the graph runs.
torch.fx.wrap("_checked_images")
torch.fx.wrap("_positions")


def _take_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: None -> all layers, n -> the last n, a sequence ->
    those layers (negative counts from the end). Returns them and the largest."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise IndexError(f"last-n ({indices}) is out of range (1 to {depth})")
        take = list(range(depth - indices, depth))
    else:
        take = [i + depth if i < 0 else i for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise IndexError(f"layer indices {list(indices)} out of range for depth {depth}")
    return take, max(take)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first layer to `rate` at the last
    (timm's and MAE's rule)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


class CrateEncoder(nn.Module):
    """Patch embedding, CLS token, fixed sin-cos positions, MSSA + ISTA layers, final norm.

    Args:
        config: The model configuration (only the encoder fields are used).
        num_classes: Size of the classification head; 0 for none (features only).
        global_pool: "token" (the CLS token), "avg" (mean of the patch tokens) or ""
            (no pooling: `forward` returns the token sequence).
        drop_path_rate: Stochastic depth at the last layer (linear from 0): the MSSA
            residual branch of a layer is dropped per sample in training. ISTA has no
            residual to drop. 0 leaves the computation exactly as it is.
        dynamic_img_size: Accept any image size that is a multiple of the patch size (the
            position table recomputed for the grid). False: the training size only.
    """

    def __init__(
        self,
        config: CrateMAEConfig,
        *,
        num_classes: int = 0,
        global_pool: str = "token",
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = True,
    ) -> None:
        super().__init__()
        d, p = config.embed_dim, config.patch_size
        self.config = config
        self.num_features = self.head_hidden_size = self.embed_dim = d
        self.num_prefix_tokens = 1  # the CLS token
        self.patch_size, self.img_size, self.grid_size = p, config.img_size, config.grid_size
        self.in_chans = config.in_chans
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size=p, in_chans=config.in_chans, embed_dim=d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        g = config.grid_size
        # Frozen and recomputable, so not part of the state dict.
        self.register_buffer("pos_embed", sincos_2d(d, g, g)[None], persistent=False)
        self.blocks = self._make_blocks(config)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=d, reduction=p)
                             for i in range(config.depth)]
        self.norm: nn.Module = nn.LayerNorm(d, eps=FINAL_NORM_EPS)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        self.set_drop_path_rate(drop_path_rate)

    @torch.jit.ignore
    def _make_blocks(self, config: CrateMAEConfig) -> nn.ModuleList:
        """The `config.depth` layers, each (B, N, d) -> (B, N, d): MSSA + ISTA here; the
        hook a subclass with other layers (`ViTEncoder`) overrides."""
        return nn.ModuleList(
            EncoderLayer(
                config.embed_dim, config.num_heads, step_size=config.ista_step_size,
                lambd=config.ista_lambda,
            )
            for _ in range(config.depth)
        )

    # --- embedding -------------------------------------------------------------------------
    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, d): the stored table, or one recomputed for another grid."""
        return _grid_positions(self.pos_embed, grid_h, grid_w, self.grid_size)

    def embed(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens with positions (B, L, d), the CLS token with its position (1, 1, d),
        and the patch positions alone (1, L, d)."""
        imgs = _checked_images(imgs, self.patch_size, self.img_size, not self.dynamic_img_size)
        pos = _positions(imgs, self.pos_embed, self.patch_size, self.grid_size)  # (1, 1+L, d)
        tokens = self.patch_embed(imgs) + pos[:, 1:]
        return tokens, self.cls_token + pos[:, :1], pos[:, 1:]

    def _sequence(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the embedded sequence, CLS first: (B, 1+L, d)."""
        tokens, cls, _ = self.embed(imgs)
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the layers and the final norm on embedded tokens: (B, N, d) -> (B, N, d)."""
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                # Recomputed in the backward pass (same RNG state, so the same drop path).
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    # --- timm's interface ------------------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on the whole, unmasked image: (B, C, H, W) -> (B, 1+L, d)."""
        return self.encode(self._sequence(imgs))

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """timm's convention: the outputs of the layers in `indices` (None: all; n: the last
        n; a list: those, negative from the end), in layer order, CLS token split off,
        as (B, d, H/p, W/p) ("NCHW") or (B, L, d) ("NLC"); `norm` passes them through the
        final norm; with `return_prefix_tokens` each is a pair (patch tokens, (B, 1, d)).
        Returns `(forward_features(x), intermediates)`, or the intermediates alone with
        `intermediates_only`; `stop_early` skips the layers after the last one wanted."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        B, _, H, W = x.shape
        x = self._sequence(x)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        found = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if i in take:
                found.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in found]  # (B, 1, d)
        found = [y[:, self.num_prefix_tokens :] for y in found]  # (B, L, d)
        if output_fmt == "NCHW":
            gh, gw = H // self.patch_size, W // self.patch_size
            found = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in found]
        out: list[Any] = list(zip(found, prefix, strict=True)) if return_prefix_tokens else found
        return out if intermediates_only else (self.norm(x), out)

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the layers after the last of `indices` (and the final norm, the head), as
        timm's feature wrapper does before it calls `forward_intermediates`."""
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def layer_tokens(
        self, imgs: torch.Tensor, indices: Sequence[int], *, norm: bool = False
    ) -> list[torch.Tensor]:
        """The whole sequence (B, 1+L, d) after each layer of `indices`, in the order given
        (negative counts from the end); with `norm`, through the final norm. What the probe
        and the feature extractor pool."""
        depth = len(self.blocks)
        if any(not -depth <= i < depth for i in indices):
            raise IndexError(f"layer indices {list(indices)} out of range for depth {depth}")
        wanted = {i % depth for i in indices}
        x = self._sequence(imgs)
        out = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                out[i] = self.norm(x) if norm else x
        return [out[i % depth] for i in indices]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1+L, d) -> (B, d): the CLS token or the mean of the patch tokens ("": as is)."""
        if self.global_pool == "avg":
            return features[:, self.num_prefix_tokens :].mean(dim=1)
        if self.global_pool == "token":
            return features[:, 0]
        return features

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(features)
        return x if pre_logits else self.head(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            head = nn.Linear(self.embed_dim, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            self.head = head.to(self.cls_token.device)
        else:
            self.head = nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations:
        the same gradients for about a forward pass more of compute and much less memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth on the layers' MSSA branches, linear from 0 to `rate` (for a
        loaded encoder, as fine-tuning builds it)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
        for block, r in zip(self.blocks, drop_path_rates(rate, len(self.blocks)), strict=True):
            block.drop_path = DropPath(r) if r > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, for layer-wise learning-rate decay (timm's format)."""
        blocks = r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        return dict(stem=r"^cls_token|^patch_embed", blocks=blocks)
