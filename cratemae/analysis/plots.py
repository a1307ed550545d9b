"""Drawing the analysis: layers.png, attention-<image>.png, pca-<image>.png.

matplotlib is imported here only, when a picture is drawn, and used through `Figure`
objects (never pyplot), so no global backend or figure state is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cratemae.errors import BadInputError
from cratemae.fs import atomic_path

__all__ = [
    "MissingDependencyError",
    "plot_attention",
    "plot_layers",
    "plot_pca",
    "require_matplotlib",
]

DPI = 100


class MissingDependencyError(BadInputError):
    """A package that one command needs (and the core does not) is not installed."""


def require_matplotlib() -> Any:
    """The `matplotlib.figure` module, or MissingDependencyError with the command to run."""
    try:
        from matplotlib import figure
    except ImportError:
        raise MissingDependencyError(
            "drawing needs matplotlib, which is not installed: pip install 'cratemae[plot]'"
        ) from None
    return figure


def _save(fig: Any, path: Path) -> Path:
    """Write the picture atomically. The format is named, not guessed from the file name:
    the temporary name does not end in `.png`."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=DPI, bbox_inches="tight")
    return path


def plot_layers(layers: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Coding rate and sparsity against depth (mean +- std over images), one panel each."""
    fig = require_matplotlib().Figure(figsize=(9, 3.4), layout="constrained")
    depth = [e["depth"] for e in layers]
    ax_rate, ax_sparse = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    panels = [
        (ax_rate, "coding_rate", "coding rate $R^c$ (nats)", "compression"),
        (ax_sparse, "sparsity", "fraction of non-zero entries", "sparsity"),
    ]
    for ax, key, ylabel, name in panels:
        mean = np.array([e[key]["mean"] for e in layers])
        std = np.array([e[key]["std"] for e in layers])
        ax.errorbar(depth, mean, yerr=std, marker="o", capsize=3, label="tokens at this depth")
        ax.set(
            xlabel="depth (0 = input to layer 0; d = output of layer d - 1)",
            ylabel=ylabel,
            title=name,
            xticks=depth,
        )
        ax.grid(alpha=0.3)
    ax_sparse.set_ylim(0, 1.05)  # a fraction: CRATE's and the ViT's figures side by side
    before = [e["coding_rate_of_layer_input"]["mean"] for e in layers[1:]]
    ax_rate.plot(
        depth[1:], before, ls="--", marker=".", color="grey", label="layer's input, same subspaces"
    )
    ax_rate.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray) -> None:
    """`heat` (gh, gw) stretched over `image` (H, W, 3), shown in grey so that every
    colour in the picture is the heat map's."""
    h, w = image.shape[:2]
    grey = image @ np.array([0.299, 0.587, 0.114])  # (H, W) luma
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_axis_off()


def plot_attention(image: np.ndarray, attention: dict[int, np.ndarray], path: Path) -> Path:
    """A grid: one row per layer, the image then each head's CLS attention over the
    patches (each map scaled to its own range)."""
    rows = sorted(attention)
    heads = attention[rows[0]].shape[0]
    fig = require_matplotlib().Figure(
        figsize=(1.4 * (heads + 1), 1.5 * len(rows)), layout="constrained"
    )
    axes = fig.subplots(len(rows), heads + 1, squeeze=False)
    for r, layer in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(f"layer {layer}")
        for k in range(heads):
            _overlay(axes[r, k + 1], image, attention[layer][k])
            if r == 0:
                axes[r, k + 1].set_title(f"head {k + 1}", fontsize="small")
    fig.suptitle("CLS attention per head", fontsize="medium")
    return _save(fig, path)


def plot_pca(image: np.ndarray, rgb: np.ndarray, layer: int, path: Path) -> Path:
    """The image beside its patches coloured by the first three principal components."""
    fig = require_matplotlib().Figure(figsize=(5, 2.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title("image", fontsize="small")
    right.imshow(rgb, interpolation="nearest")
    right.set_title(f"PCA of layer {layer} features (RGB = PC 1-3)", fontsize="small")
    for ax in (left, right):
        ax.set_axis_off()
    return _save(fig, path)
