"""Count likelihoods (he2st.methods.nn.likelihoods) against hand values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from he2st.methods.nn.likelihoods import NBHead, ZINBHead, nb_log_prob, nb_nll, nb_variance, zinb_nll


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_nb_hand_values() -> None:
    # mu = 3, theta = 2: p0 = (theta / (theta + mu))**theta = (2/5)**2 = 0.16;
    # p1 = theta * p0 * mu / (theta + mu) = 2 * 0.16 * 0.6 = 0.192.
    x = _t(0, 1)
    mu = _t(3, 3)
    theta = _t(2, 2)
    nll = nb_nll(x, mu, theta).numpy()
    np.testing.assert_allclose(nll, [-math.log(0.16), -math.log(0.192)], rtol=1e-6)


def test_nb_theta_one_is_geometric() -> None:
    # theta = 1: P(x) = (1 / (1 + mu)) * (mu / (1 + mu))**x. mu = 4, x = 3: 0.2 * 0.8**3 = 0.1024.
    lp = nb_log_prob(_t(3), _t(4), _t(1)).item()
    assert lp == pytest.approx(math.log(0.1024), rel=1e-6)


@pytest.mark.parametrize(
    ("mu", "theta"), [(0.5, 0.3), (3.0, 2.0), (40.0, 10.0), (1200.0, 1.5), (7.0, 500.0)]
)
def test_nb_matches_scipy(mu: float, theta: float) -> None:
    x = np.array([0, 1, 2, 5, 13, 100, 2000], dtype=np.float64)
    ours = nb_log_prob(torch.from_numpy(x), torch.full((7,), mu, dtype=torch.float64), torch.full((7,), theta, dtype=torch.float64))
    # scipy: nbinom(n=theta, p=theta / (theta + mu)) has mean mu and variance mu + mu^2/theta.
    ref = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_nb_variance_matches_scipy() -> None:
    mu, theta = _t(0.5, 3, 40), _t(0.3, 2, 10)
    ref = [stats.nbinom.var(th, th / (th + m)) for m, th in zip(mu.tolist(), theta.tolist())]
    np.testing.assert_allclose(nb_variance(mu, theta).numpy(), ref, rtol=1e-10)
    # Hand value: 3 + 9 / 2 = 7.5.
    assert nb_variance(_t(3), _t(2)).item() == pytest.approx(7.5)


def test_nb_tends_to_poisson_for_large_theta() -> None:
    x = _t(0, 2, 7)
    ours = nb_log_prob(x, _t(3, 3, 3), _t(1e7, 1e7, 1e7)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x.numpy(), 3.0), rtol=1e-5, atol=1e-5)


def test_zinb_hand_values_and_scipy() -> None:
    mu, theta, pi = 3.0, 2.0, 0.25
    x = _t(0, 1, 4)
    nll = zinb_nll(x, _t(mu, mu, mu), _t(theta, theta, theta), _t(pi, pi, pi)).numpy()
    # P(0) = pi + (1 - pi) * 0.16 = 0.25 + 0.75 * 0.16 = 0.37; P(1) = 0.75 * 0.192 = 0.144.
    assert nll[0] == pytest.approx(-math.log(0.37), rel=1e-6)
    assert nll[1] == pytest.approx(-math.log(0.144), rel=1e-6)
    ref4 = math.log(1 - pi) + stats.nbinom.logpmf(4, theta, theta / (theta + mu))
    assert nll[2] == pytest.approx(-ref4, rel=1e-6)


def test_zinb_without_dropout_is_nb() -> None:
    x = _t(0, 3, 9)
    mu, theta = _t(2, 2, 2), _t(5, 5, 5)
    np.testing.assert_allclose(
        zinb_nll(x, mu, theta, _t(0, 0, 0)).numpy(), nb_nll(x, mu, theta).numpy(), rtol=1e-6, atol=1e-6
    )


def test_heads_give_valid_parameters_and_gradients() -> None:
    torch.manual_seed(0)
    h = torch.randn(6, 8)
    mu, theta = NBHead(8, 4)(h)
    assert mu.shape == theta.shape == (6, 4)
    assert (mu > 0).all() and (theta > 0).all()
    mu2, theta2, pi = ZINBHead(8, 4)(h)
    assert ((pi > 0) & (pi < 1)).all()
    loss = zinb_nll(torch.tensor([[0.0, 1, 5, 200]] * 6), mu2, theta2, pi).mean()
    loss.backward()
    assert torch.isfinite(loss)
