"""Pre-training's validation measures (`cratemae.eval.validation`): the loss over the subset
does not depend on how it is batched, each image keeps its own mask, and the masks and the
draw are fixed by the seed."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cratemae.distributed.precision import Precision
from cratemae.eval.validation import validation_masks, validation_pass

FP32 = Precision("fp32", "cpu", "")


class PerImageLoss(torch.nn.Module):
    """Stands in for a `CrateMAE`: the loss of a batch is the mean over its images of
    (image mean + its noise row's sum); the CLS feature is the image's first pixels."""

    def forward(self, imgs: torch.Tensor, *, mask_ratio: float, noise: torch.Tensor):
        per_image = imgs.mean(dim=(1, 2, 3)) + noise.sum(dim=1)  # (B,)
        return SimpleNamespace(loss=per_image.mean() * mask_ratio)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs.flatten(2).transpose(1, 2)[:, :2]  # (B, 2 tokens, 3)


def test_the_loss_is_per_image_whatever_the_batches() -> None:
    g = torch.Generator().manual_seed(0)
    imgs, labels = torch.randn(7, 3, 4, 4, generator=g), torch.arange(7)
    noise = validation_masks(7, 5, seed=3)  # (7, L)
    model = PerImageLoss()
    whole = validation_pass(model, [(imgs, labels)], noise=noise, mask_ratio=0.5,
                            precision=FP32)
    starts: list[int] = []
    split = validation_pass(model, [(imgs[:3], labels[:3]), (imgs[3:4], labels[3:4]),
                                    (imgs[4:], labels[4:])], noise=noise, mask_ratio=0.5,
                            precision=FP32, each=lambda batch, start: starts.append(start))
    expected = 0.5 * float((imgs.mean(dim=(1, 2, 3)) + noise.sum(dim=1)).mean())
    assert abs(whole.loss - expected) < 1e-6 and abs(split.loss - expected) < 1e-6
    assert starts == [0, 3, 4] and split.count == whole.count == 7
    assert torch.equal(split.features, imgs.flatten(2)[:, :, 0])  # CLS (N, d), in order
    assert torch.equal(torch.cat(split.labels), labels)


def test_the_masks_are_fixed_by_the_seed() -> None:
    a = validation_masks(6, 16, seed=0)
    assert a.shape == (6, 16)
    assert torch.equal(a, validation_masks(6, 16, seed=0))
    assert not torch.equal(a, validation_masks(6, 16, seed=1))
    assert not torch.equal(a[0], a[1])  # one mask per image
