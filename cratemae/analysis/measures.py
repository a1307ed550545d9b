"""The two quantities the sparse rate reduction objective is made of, measured on tokens.

- Coding rate R^c (compression): for per-head subspace coordinates u_k (tokens as rows),
  R^c = 1/2 sum_k logdet(I_N + p / (N eps^2) u_k u_k^T), each token's u_k first normalised
  to unit length, so that the number is about the tokens' directions, not their scale.
- Sparsity: the fraction of non-zero entries, ||Z||_0 / (d N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["EPS2", "NonFiniteTokens", "coding_rate", "sparsity"]

# eps^2 of the coding rate, as in the CRATE papers.
EPS2 = 0.01


class NonFiniteTokens(ValueError):
    """Tokens with inf or NaN (weights that overflow): no coding rate to measure."""


def coding_rate(u: torch.Tensor, eps2: float = EPS2, *, normalize: bool = True) -> torch.Tensor:
    """R^c per sample: u (B, K, N, p) -> (B,) float64, in nats.

    The log-determinant is taken in float64 through a Cholesky factor: I + a * Gram is
    symmetric with every eigenvalue >= 1, so the factor exists and its log-diagonal sums
    to the log-determinant without the overflow of det() or the pivoting of a general LU.
    """
    if u.dim() != 4:
        raise ValueError(f"coding_rate expects u of shape (B, K, N, p), got {tuple(u.shape)}")
    u = u.to(torch.float64)
    if normalize:
        u = F.normalize(u, dim=-1)  # every token's u_k on the unit sphere; zero stays zero
    N, p = u.shape[-2:]
    scale = p / (N * eps2)
    # Sylvester: det(I_N + a u u^T) = det(I_p + a u^T u); factor the smaller Gram matrix.
    gram = u.transpose(-2, -1) @ u if p < N else u @ u.transpose(-2, -1)  # (B, K, m, m)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=u.device)
    factor, info = torch.linalg.cholesky_ex(eye + scale * gram)
    if bool((info != 0).any()):  # only for non-finite input
        raise NonFiniteTokens("coding_rate: the tokens hold non-finite values")
    logdet = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B, K)
    return 0.5 * logdet.sum(-1)


def sparsity(z: torch.Tensor) -> torch.Tensor:
    """Fraction of non-zero entries per sample: z (B, N, d) -> (B,) float64."""
    return (z != 0).flatten(1).to(torch.float64).mean(dim=1)
