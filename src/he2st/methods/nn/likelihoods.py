"""Count likelihoods: negative binomial (STimage) and zero-inflated NB (Hist2ST).

Parameterisation: mean ``mu > 0`` and inverse dispersion ``theta > 0`` so that
``Var = mu + mu**2 / theta`` (scipy's ``nbinom(n=theta, p=theta/(theta+mu))``).
The ZINB adds a dropout probability ``pi`` in [0, 1) of an extra zero.
All functions return the negative log-likelihood per element (no reduction).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_EPS = 1e-8


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mu, theta), elementwise.

    Parameters
    ----------
    x
        Observed counts (any shape; non-integer values are allowed).
    mu
        NB mean, ``> 0``, broadcastable with ``x``.
    theta
        NB inverse dispersion, ``> 0``, broadcastable with ``x``.

    Returns
    -------
    torch.Tensor
        Log-probabilities, of the broadcast shape of the inputs.
    """
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
    )


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Negative binomial negative log-likelihood, elementwise.

    Parameters
    ----------
    x
        Observed counts (any shape; non-integer values are allowed).
    mu
        NB mean, ``> 0``, broadcastable with ``x``.
    theta
        NB inverse dispersion, ``> 0``, broadcastable with ``x``.

    Returns
    -------
    torch.Tensor
        ``-log NB(x; mu, theta)``, of the broadcast shape of the inputs (no
        reduction).
    """
    return -nb_log_prob(x, mu, theta)


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Zero-inflated NB negative log-likelihood, elementwise.

    ``P(0) = pi + (1-pi) NB(0)``; ``P(x>0) = (1-pi) NB(x)``. Computed in log
    space for stability.

    Parameters
    ----------
    x
        Observed counts (any shape; non-integer values are allowed).
    mu
        NB mean, ``> 0``, broadcastable with ``x``.
    theta
        NB inverse dispersion, ``> 0``, broadcastable with ``x``.
    pi
        Dropout (extra-zero) probability, clamped to ``[1e-8, 1 - 1e-6]``,
        broadcastable with ``x``.

    Returns
    -------
    torch.Tensor
        ZINB negative log-likelihood, of the broadcast shape of the inputs (no
        reduction); counts below 0.5 are treated as zeros.
    """
    pi = pi.clamp(_EPS, 1 - 1e-6)
    log_nb = nb_log_prob(x, mu, theta)
    log_zero = torch.logaddexp(torch.log(pi), torch.log1p(-pi) + log_nb)
    log_pos = torch.log1p(-pi) + log_nb
    return -torch.where(x < 0.5, log_zero, log_pos)


def nb_variance(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Variance of NB(mu, theta).

    Parameters
    ----------
    mu
        NB mean.
    theta
        NB inverse dispersion (broadcastable with ``mu``).

    Returns
    -------
    torch.Tensor
        ``mu + mu**2 / theta``, elementwise.
    """
    return mu + mu.pow(2) / theta


class NBHead(nn.Module):
    """Linear head giving NB mean and inverse dispersion per gene.

    The mean is ``exp(log_mu)``; the per-spot library size is not modelled
    (the caller may multiply ``mu`` by a size factor).

    Parameters
    ----------
    in_dim
        Width of the input features.
    n_genes
        Number of genes (outputs of each linear map).
    """

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.mu = nn.Linear(in_dim, n_genes)
        self.theta = nn.Linear(in_dim, n_genes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NB parameters per gene.

        Parameters
        ----------
        h
            ``(..., in_dim)`` features.

        Returns
        -------
        mu, theta
            ``(..., n_genes)`` mean ``exp(.)`` (log-mean clamped at 15) and
            inverse dispersion ``softplus(.) + 1e-4``.
        """
        mu = torch.exp(self.mu(h).clamp(max=15.0))
        theta = F.softplus(self.theta(h)) + 1e-4
        return mu, theta


class ZINBHead(nn.Module):
    """Linear heads for ZINB mean, inverse dispersion and dropout (Hist2ST).

    Parameters
    ----------
    in_dim
        Width of the input features.
    n_genes
        Number of genes (outputs of each linear map).
    """

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.nb = NBHead(in_dim, n_genes)
        self.pi = nn.Linear(in_dim, n_genes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZINB parameters per gene.

        Parameters
        ----------
        h
            ``(..., in_dim)`` features.

        Returns
        -------
        mu, theta, pi
            ``(..., n_genes)`` mean, inverse dispersion (as :class:`NBHead`)
            and dropout probability ``sigmoid(.)``.
        """
        mu, theta = self.nb(h)
        return mu, theta, torch.sigmoid(self.pi(h))
