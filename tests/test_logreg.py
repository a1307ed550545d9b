"""The `features` probe's classifier (`cratemae.eval.logreg`) on small synthetic features:
the fit against scikit-learn's, the scoring, and the held-out weight-decay choice being
deterministic given its seed. Each test runs in well under a second or two."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from cratemae.eval.logreg import LinearFit, fit_logreg, holdout_split, select_weight_decay

CPU = torch.device("cpu")


def blobs(n: int, num_classes: int, dim: int, spread: float, seed: int, noise_seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) float64 features around one random centre per class (drawn from `seed`;
    the noise from `noise_seed`, so that a test set shares the centres), offset from 0 and
    unevenly scaled (so the standardisation matters), and (n,) labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * spread
    y = torch.arange(n) % num_classes
    gen = torch.Generator().manual_seed(1000 + noise_seed)
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    scale = torch.linspace(0.5, 3.0, dim, dtype=torch.float64)
    return (centres[y] + noise) * scale + 2.0, y


# --- the fit, against scikit-learn ----------------------------------------------------------
def test_fit_logreg_matches_scikit_learn() -> None:
    """Same objective, same optimum. fit_logreg minimises mean CE + wd/2 ||W||^2; sklearn
    minimises C * sum CE + 1/2 ||W||^2 (intercept unpenalised, multinomial with lbfgs):
    divided by C * N that is mean CE + 1/(2 C N) ||W||^2, so C = 1 / (wd * N). Both fit the
    features standardised by fit_logreg's own mean and (unbiased) std, which sklearn is
    handed directly. Coefficients agree to 1e-4 absolute (they are of order 1; L-BFGS stops
    at a gradient of 1e-7); the intercepts too, once centred (a constant added to every
    class's intercept changes no probability); the predictions are identical."""
    n, num_classes, wd = 150, 3, 1e-2
    x, y = blobs(n, num_classes, dim=5, spread=1.5, seed=0)
    fit = fit_logreg(x, y, num_classes, wd, max_iter=200, device=CPU)
    z = ((x - fit.mean) / fit.std).numpy()
    ref = LogisticRegression(C=1.0 / (wd * n), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
    np.testing.assert_allclose(fit.weight.numpy().T, ref.coef_, atol=1e-4, rtol=0)
    ours_b, ref_b = fit.bias.numpy(), ref.intercept_
    np.testing.assert_allclose(ours_b - ours_b.mean(), ref_b - ref_b.mean(), atol=1e-4, rtol=0)
    x_test, y_test = blobs(90, num_classes, dim=5, spread=1.5, seed=0, noise_seed=1)
    z_test = ((x_test - fit.mean) / fit.std).numpy()
    np.testing.assert_array_equal(fit.logits(x_test).argmax(dim=1).numpy(),
                                  ref.predict(z_test))
    top1 = fit.accuracy(x_test, y_test)[0]
    assert top1 == pytest.approx(100 * ref.score(z_test, y_test.numpy()))
    assert 50 < top1 < 100  # overlapping blobs: neither trivial nor hopeless


# --- the scoring -----------------------------------------------------------------------------
def test_accuracy_counts_top1_and_top5_by_hand() -> None:
    """Identity weights: the logits are the features themselves."""
    fit = LinearFit(mean=torch.zeros(6), std=torch.ones(6), weight=torch.eye(6),
                    bias=torch.zeros(6))
    ramp = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    x = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0], ramp, ramp, ramp])
    y = torch.tensor([2, 5, 1, 0])  # hit, hit, top-5 only, lowest logit: missed by both
    assert fit.accuracy(x, y) == (50.0, 75.0)


def test_accuracy_separable_is_100_and_shuffled_labels_are_chance() -> None:
    num_classes = 6
    x, y = blobs(120, num_classes, dim=8, spread=8.0, seed=2)
    fit = fit_logreg(x, y, num_classes, 1e-3, max_iter=200, device=CPU)
    x_test, y_test = blobs(600, num_classes, dim=8, spread=8.0, seed=2, noise_seed=1)
    assert fit.accuracy(x_test, y_test) == (100.0, 100.0)
    shuffled = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(3))]
    top1, top5 = fit.accuracy(x_test, shuffled)
    assert abs(top1 - 100 / num_classes) < 6  # chance 16.7 %; one std is 1.5 points
    assert abs(top5 - 500 / num_classes) < 6


# --- the held-out choice ---------------------------------------------------------------------
def test_holdout_split_is_a_seeded_partition() -> None:
    fit_idx, held = holdout_split(50, 0.2, seed=7)
    again = holdout_split(50, 0.2, seed=7)
    assert torch.equal(fit_idx, again[0]) and torch.equal(held, again[1])
    assert len(held) == 10 and len(fit_idx) == 40
    assert sorted(torch.cat([fit_idx, held]).tolist()) == list(range(50))
    assert torch.equal(held, held.sort().values)
    assert not torch.equal(held, holdout_split(50, 0.2, seed=8)[1])


def test_select_weight_decay_is_deterministic_and_scores_the_held_out_part() -> None:
    num_classes, grid = 3, [1e-2, 10.0]
    x, y = blobs(120, num_classes, dim=4, spread=1.0, seed=4)
    args = dict(grid=grid, fraction=0.25, seed=5, max_iter=50, device=CPU)
    scores = select_weight_decay(x, y, num_classes, **args)
    assert scores == select_weight_decay(x, y, num_classes, **args)
    fit_idx, held = holdout_split(len(y), 0.25, seed=5)
    by_hand = [fit_logreg(x[fit_idx], y[fit_idx], num_classes, wd, 50, CPU)
               .accuracy(x[held], y[held])[0] for wd in grid]
    assert scores == pytest.approx(by_hand, abs=1e-9)
