"""The k-NN classifier of pre-training's validation (`val_knn_top1`): a weighted vote of the
nearest training features (cosine, k = 20, temperature 0.07, as DINO and InstDisc), on the
encoder's CLS feature. No training: it says how well the features separate the classes
at any step, for the price of two passes over small subsets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from cratemae.distributed.precision import Precision
from cratemae.model import CrateMAE

__all__ = ["KNN_K", "KNN_TEMPERATURE", "cls_features", "knn_top1"]

KNN_K, KNN_TEMPERATURE = 20, 0.07


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
             test_labels: torch.Tensor, *, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 (percent) of the weighted k-NN vote: each of the k most cosine-similar training
    features votes for its class with weight exp(similarity / temperature).

    train (N, d), train_labels (N,), test (M, d), test_labels (M,)."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    similarity = test @ train.T  # (M, N)
    top, index = similarity.topk(min(k, train.shape[0]), dim=1)  # (M, k)
    classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    votes = torch.zeros(test.shape[0], classes, dtype=torch.float32, device=test.device)
    votes.scatter_add_(1, train_labels.to(test.device)[index], (top / temperature).exp())
    correct = votes.argmax(dim=1) == test_labels.to(test.device)
    return 100.0 * float(correct.double().mean())


@torch.no_grad()
def cls_features(model: CrateMAE, batches: Iterable[tuple[torch.Tensor, Any]],
                 precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS feature of every unmasked image, float32 (N, d), and the labels (N,), of
    (images, labels) batches: the side of the vote the k-NN is fitted on."""
    feats, labels = [], []
    for imgs, y in batches:
        with precision.autocast():
            feats.append(model.forward_features(imgs)[:, 0].float())  # CLS (B, d)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
