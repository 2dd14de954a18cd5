"""Contrastive and reconstruction losses of the retrieval methods.

For a batch of ``B`` paired image embeddings ``I`` and expression embeddings
``E`` (rows are spots), with temperature ``tau``:

- logits ``L = E I^T / tau`` (row ``i``: spot ``i``'s expression against every
  image of the batch);
- *hard* targets (CLIP; mclSTExp eq. 9): the identity matrix;
- *soft* targets (BLEEP; CMRCNet): ``T = softmax((I I^T + E E^T) / 2 * tau)``
  row-wise, so that spots that look alike and express alike are not pushed
  apart as negatives;
- ``loss_expr = CE(L, T)`` and ``loss_image = CE(L^T, T^T)``, cross-entropy with
  probability targets per row, averaged over rows;
- total ``lambda * loss_image + (1 - lambda) * loss_expr`` (mclSTExp Table
  S7; ``lambda = 0.5`` is BLEEP's and mclSTExp's symmetric mean).

As in the three reference implementations, similarities are plain dot
products of the (LayerNorm-ed) projections, not of L2-normalised vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TARGETS = ("hard", "soft")
RECONSTRUCTION = ("mse", "cosine")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row ``-sum_j targets_ij * log_softmax(logits)_ij`` (shape ``(B,)``).

    Parameters
    ----------
    logits
        ``(B, C)`` unnormalised scores.
    targets
        ``(B, C)`` target probabilities (rows summing to 1).

    Returns
    -------
    torch.Tensor
        ``(B,)`` cross-entropy of each row.
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def hard_targets(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Identity targets: spot ``i`` matches image ``i`` only.

    Parameters
    ----------
    n
        Batch size.
    device
        Device of the result (None: the default device).
    dtype
        Floating dtype of the result.

    Returns
    -------
    torch.Tensor
        ``(n, n)`` identity matrix.
    """
    return torch.eye(n, device=device, dtype=dtype)


def soft_targets(image: torch.Tensor, expression: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's targets ``softmax((I I^T + E E^T) / 2 * tau)`` (row-wise).

    Note the temperature *multiplies* here while it divides the logits, as in
    BLEEP's code; with the default ``tau = 1`` both are the identity.

    Parameters
    ----------
    image
        ``(B, D)`` image embeddings.
    expression
        ``(B, D)`` expression embeddings, row ``i`` paired with image row ``i``.
    temperature
        ``tau``, multiplying the mean similarity before the softmax.

    Returns
    -------
    torch.Tensor
        ``(B, B)`` row-stochastic target matrix.
    """
    sim = (image @ image.T + expression @ expression.T) / 2.0
    return F.softmax(sim * temperature, dim=-1)


def contrastive_loss(
    image: torch.Tensor,
    expression: torch.Tensor,
    *,
    targets: str = "soft",
    temperature: float = 1.0,
    lam: float = 0.5,
) -> torch.Tensor:
    """Symmetric CLIP-style loss between paired embeddings.

    Parameters
    ----------
    image, expression
        ``(B, D)`` paired embeddings (row ``i`` of each is spot ``i``).
    targets
        ``"soft"`` (BLEEP, CMRCNet) or ``"hard"`` (CLIP, mclSTExp).
    temperature
        ``tau``; logits are divided by it (soft targets multiply by it).
    lam
        Weight of the image->expression term; ``1 - lam`` weighs the
        expression->image term.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if image.shape != expression.shape:
        raise ValueError(f"image {tuple(image.shape)} and expression {tuple(expression.shape)} embeddings differ in shape")
    logits = expression @ image.T / temperature
    if targets == "soft":
        t = soft_targets(image, expression, temperature)
    else:
        t = hard_targets(len(image), image.device, logits.dtype)
    loss_expr = soft_cross_entropy(logits, t)
    loss_image = soft_cross_entropy(logits.T, t.T)
    return (lam * loss_image + (1.0 - lam) * loss_expr).mean()


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``"mse"``: mean squared error; ``"cosine"``: mean ``1 - cos(prediction, target)`` over rows.

    Parameters
    ----------
    prediction
        ``(B, D)`` reconstructed features.
    target
        ``(B, D)`` features to reconstruct.
    kind
        ``"mse"`` or ``"cosine"``.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(prediction, target, dim=-1)).mean()
    raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION}, got {kind!r}")


def pearson_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - mean_g r_g``: one minus the mean per-gene Pearson correlation over spots.

    The correlation term of SpaHGC's objective (eq. 25; ``wenwenmin/SpaHGC``
    train.py ``correlationMetric``). ``eps`` in the denominator keeps a constant
    gene at ``r = 0`` instead of NaN.

    Parameters
    ----------
    prediction, target
        ``(n_spots, n_genes)``.

    Returns
    -------
    torch.Tensor
        Scalar in ``[0, 2]``.
    """
    p = prediction - prediction.mean(dim=0, keepdim=True)
    t = target - target.mean(dim=0, keepdim=True)
    r = (p * t).sum(dim=0) / (p.norm(dim=0) * t.norm(dim=0) + eps)
    return 1.0 - r.mean()


def cosine_consistency_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 - 2 * mean_i cos(a_i, b_i)``: BGRL's view-consistency loss (SpaHGC eq. 13).

    Parameters
    ----------
    a, b
        ``(n, d)`` embeddings of the same nodes under two views.

    Returns
    -------
    torch.Tensor
        Scalar in ``[0, 4]``; 0 when every pair points the same way.
    """
    return 2.0 - 2.0 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1).mean()
