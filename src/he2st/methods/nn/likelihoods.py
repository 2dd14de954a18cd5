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
    """log NB(x; mu, theta), elementwise."""
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
    )


def nb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Negative binomial negative log-likelihood, elementwise."""
    return -nb_log_prob(x, mu, theta)


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Zero-inflated NB negative log-likelihood, elementwise.

    ``P(0) = pi + (1-pi) NB(0)``; ``P(x>0) = (1-pi) NB(x)``. Computed in log
    space for stability.
    """
    pi = pi.clamp(_EPS, 1 - 1e-6)
    log_nb = nb_log_prob(x, mu, theta)
    log_zero = torch.logaddexp(torch.log(pi), torch.log1p(-pi) + log_nb)
    log_pos = torch.log1p(-pi) + log_nb
    return -torch.where(x < 0.5, log_zero, log_pos)


def nb_variance(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Variance of NB(mu, theta)."""
    return mu + mu.pow(2) / theta


class NBHead(nn.Module):
    """Linear head giving NB mean and inverse dispersion per gene.

    The mean is ``exp(log_mu)``; the per-spot library size is not modelled
    (the caller may multiply ``mu`` by a size factor).
    """

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.mu = nn.Linear(in_dim, n_genes)
        self.theta = nn.Linear(in_dim, n_genes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = torch.exp(self.mu(h).clamp(max=15.0))
        theta = F.softplus(self.theta(h)) + 1e-4
        return mu, theta


class ZINBHead(nn.Module):
    """Linear heads for ZINB mean, inverse dispersion and dropout (Hist2ST)."""

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.nb = NBHead(in_dim, n_genes)
        self.pi = nn.Linear(in_dim, n_genes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, theta = self.nb(h)
        return mu, theta, torch.sigmoid(self.pi(h))
