"""Per-image measurements -> per-depth means and deviations; a PCA fitted over many images.

Both accumulate batch by batch, so any number of images fits in memory, and both give the
same numbers whatever the batch size.
"""

from __future__ import annotations

from typing import Any

import torch

from cratemae.analysis.record import LayerRecord

__all__ = ["LayerSummary", "PatchPCA"]


def _stats(values: torch.Tensor) -> dict[str, float]:
    """Mean and (population) standard deviation over images of a (n,) tensor."""
    return {"mean": float(values.mean()), "std": float(values.std(correction=0))}


class LayerSummary:
    """Collects `LayerRecord`s; `to_dict()` gives the layers.json record of every depth."""

    def __init__(self) -> None:
        self._rate: list[torch.Tensor] = []  # each (B, L+1)
        self._rate_in: list[torch.Tensor] = []  # each (B, L)
        self._sparse: list[torch.Tensor] = []  # each (B, L+1)

    def add(self, record: LayerRecord) -> None:
        self._rate.append(record.coding_rate)
        self._rate_in.append(record.coding_rate_input)
        self._sparse.append(record.sparsity)

    @property
    def num_images(self) -> int:
        return sum(r.shape[0] for r in self._rate)

    def per_image(self) -> dict[str, torch.Tensor]:
        """All images' values: coding_rate, sparsity (n, L+1); coding_rate_input (n, L)."""
        return {
            "coding_rate": torch.cat(self._rate),
            "coding_rate_input": torch.cat(self._rate_in),
            "sparsity": torch.cat(self._sparse),
        }

    def layers(self) -> list[dict[str, Any]]:
        """One entry per depth: 0 is the input to layer 0, d the output of layer d - 1
        (`"layer"`: numbered from 0, as --pca-layer and probe.layer; None for the input)."""
        values = self.per_image()
        rate, rate_in, sparse = (
            values["coding_rate"],
            values["coding_rate_input"],
            values["sparsity"],
        )
        out = []
        for depth in range(rate.shape[1]):
            entry: dict[str, Any] = {
                "depth": depth,
                "layer": depth - 1 if depth else None,
                "tokens": "input to layer 0" if depth == 0 else f"output of layer {depth - 1}",
                "subspaces_of_layer": max(depth - 1, 0),
                "coding_rate": _stats(rate[:, depth]),
            }
            if depth > 0:
                entry["coding_rate_of_layer_input"] = _stats(rate_in[:, depth - 1])
            entry["sparsity"] = _stats(sparse[:, depth])
            out.append(entry)
        return out


class PatchPCA:
    """Principal components of patch features, fitted jointly over every image given.

    Keeps the sum and the sum of outer products in float64 ((d,) and (d, d)), never the
    features themselves.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        """features (B, L, d) or (n, d)."""
        x = features.reshape(-1, features.shape[-1]).to(torch.float64)
        if self._sum is None or self._outer is None:
            self._sum, self._outer = x.sum(0), x.T @ x
        else:
            self._sum, self._outer = self._sum + x.sum(0), self._outer + x.T @ x
        self.count += x.shape[0]

    def fit(self, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (d,), components (d, k)), largest variance first; each component's sign
        is fixed (largest loading positive) so that colours do not flip between runs."""
        if self._sum is None or self._outer is None or self.count < 2:
            raise ValueError("PatchPCA.fit: needs the features of at least two patches")
        mean = self._sum / self.count
        cov = self._outer / self.count - torch.outer(mean, mean)  # (d, d)
        _, vectors = torch.linalg.eigh(cov)  # eigenvalues ascending
        comps = vectors[:, -k:].flip(-1)  # (d, k)
        signs = comps.gather(0, comps.abs().argmax(0, keepdim=True)).sign()
        return mean, comps * signs

    def variance_ratio(self, k: int = 3) -> list[float]:
        """The fraction of the total variance that each of the first k components holds."""
        if self._sum is None or self._outer is None:
            return []
        mean = self._sum / self.count
        values = torch.linalg.eigvalsh(self._outer / self.count - torch.outer(mean, mean))
        total = values.clamp_min(0).sum()
        return [float(v / total) for v in values.flip(0)[:k]]
