"""Shared parts of the contrastive methods: losses (hand-computed), heads, position encodings."""

from __future__ import annotations

import math

import pytest
import torch

from he2st.methods.nn.attention import MultiHeadAttention, TransformerBlock
from he2st.methods.nn.heads import SNN, ProjectionHead
from he2st.methods.nn.losses import contrastive_loss, reconstruction_loss, soft_targets
from he2st.methods.nn.position import (
    LearnablePositionEncoding,
    NaivePositionEncoding,
    make_position_encoding,
    sinusoidal_1d,
)

I3 = torch.eye(3)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# -- losses ------------------------------------------------------------------------------
# With image embeddings I = identity, the logits E I^T / tau are E / tau itself, so every
# term below is written out from the 3x3 matrix E by hand.

E_ASYM = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_hard_target_loss_hand_computed() -> None:
    # Rows of E: CE with target i is lse(row) - row[i].
    expr_terms = [lse(0, 1, 1) - 0, lse(0, 0, 0) - 0, lse(0, 0, 0) - 0]
    # Rows of E^T (columns of E): [0,0,0], [1,0,0], [1,0,0]
    image_terms = [lse(0, 0, 0), lse(1, 0, 0), lse(1, 0, 0)]
    l_expr, l_img = sum(expr_terms) / 3, sum(image_terms) / 3
    assert l_expr == pytest.approx((math.log(1 + 2 * math.e) + 2 * math.log(3)) / 3)
    got = contrastive_loss(I3, E_ASYM, targets="hard", lam=0.5)
    assert got.item() == pytest.approx(0.5 * l_img + 0.5 * l_expr, rel=1e-6)
    # lambda weighs the image->expression term (mclSTExp Table S7)
    assert contrastive_loss(I3, E_ASYM, targets="hard", lam=1.0).item() == pytest.approx(l_img, rel=1e-6)
    assert contrastive_loss(I3, E_ASYM, targets="hard", lam=0.0).item() == pytest.approx(l_expr, rel=1e-6)
    assert l_img != pytest.approx(l_expr)  # the two directions really differ here


def test_hard_target_temperature() -> None:
    e = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # tau = 2 halves the logits: diag(1, 0.5, 0); E symmetric so both directions agree.
    want = (lse(1, 0, 0) - 1 + lse(0, 0.5, 0) - 0.5 + math.log(3)) / 3
    assert contrastive_loss(I3, e, targets="hard", temperature=2.0).item() == pytest.approx(want, rel=1e-6)


def test_soft_target_loss_hand_computed() -> None:
    e = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # BLEEP targets: softmax((I I^T + E E^T) / 2 * tau) = softmax(diag(2.5, 1, 0.5)) row-wise.
    s = [2.5, 1.0, 0.5]
    t = [[math.exp(s[i]) / (math.exp(s[i]) + 2) if j == i else 1 / (math.exp(s[i]) + 2) for j in range(3)]
         for i in range(3)]
    torch.testing.assert_close(soft_targets(I3, e), torch.tensor(t))
    logits = [[2.0, 0, 0], [0, 1.0, 0], [0, 0, 0]]

    def ce(row_logits: list[float], row_t: list[float]) -> float:
        z = lse(*row_logits)
        return -sum(tt * (lg - z) for tt, lg in zip(row_t, row_logits))

    # expression -> image: rows of the logits against rows of T
    l_expr = sum(ce(logits[i], t[i]) for i in range(3)) / 3
    # image -> expression: rows of logits^T (= logits here) against rows of T^T, i.e. columns of T
    # (as in BLEEP's code; columns of T need not sum to one)
    l_img = sum(ce(logits[i], [t[j][i] for j in range(3)]) for i in range(3)) / 3
    assert contrastive_loss(I3, e, targets="soft").item() == pytest.approx((l_expr + l_img) / 2, rel=1e-6)
    assert contrastive_loss(I3, e, targets="soft", lam=1.0).item() == pytest.approx(l_img, rel=1e-6)


def test_soft_targets_use_temperature_as_multiplier() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.zeros(2, 2)
    # sim = (a a^T) / 2 = 0.5 I; times tau = 4 -> diag 2: softmax([2, 0]) per row
    p = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(soft_targets(a, b, temperature=4.0), torch.tensor([[p, 1 - p], [1 - p, p]]))


def test_contrastive_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="targets"):
        contrastive_loss(I3, I3, targets="fuzzy")
    with pytest.raises(ValueError, match="shape"):
        contrastive_loss(I3, torch.zeros(3, 2))


def test_reconstruction_losses() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 4.0]])
    assert reconstruction_loss(x, y, "mse").item() == pytest.approx((1 + 1 + 0 + 4) / 4)
    # cosine: rows orthogonal (1 - 0) and parallel (1 - 1)
    assert reconstruction_loss(x, y, "cosine").item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        reconstruction_loss(x, y, "l3")


# -- heads ----------------------------------------------------------------------------------


def test_projection_head_structure() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(5, 4, dropout=0.1).eval()
    x = torch.randn(3, 5)
    h = head.projection(x)
    want = torch.nn.functional.layer_norm(h + head.fc(torch.nn.functional.gelu(h)), (4,),
                                          head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(x), want)
    # residual: with the second linear zeroed, the output is LayerNorm(W1 x + b1)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
    torch.testing.assert_close(head(x), torch.nn.functional.layer_norm(h, (4,), head.layer_norm.weight,
                                                                         head.layer_norm.bias))


def test_snn_is_selu_then_alpha_dropout() -> None:
    torch.manual_seed(0)
    snn = SNN(6, 10, dropout=0.25)
    x = torch.randn(4, 6)
    snn.eval()
    torch.testing.assert_close(snn(x), torch.selu(snn.linear(x)))
    assert isinstance(snn.dropout, torch.nn.AlphaDropout) and snn.dropout.p == 0.25
    snn.train()
    assert not torch.equal(snn(x), torch.selu(snn.linear(x)))


def test_attention_shapes_and_cross_attention() -> None:
    torch.manual_seed(0)
    att = MultiHeadAttention(20, heads=8, head_dim=64)  # inner width 512 != token width (mclSTExp)
    x, ctx = torch.randn(2, 5, 20), torch.randn(2, 3, 20)
    assert att(x).shape == (2, 5, 20) and att(x, ctx).shape == (2, 5, 20)
    # a context of identical tokens makes every query get the same value
    same = ctx[:, :1].expand(2, 3, 20)
    out = att(x, same)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))
    block = TransformerBlock(20, heads=8, head_dim=64, mlp_dim=20)
    assert block(x).shape == (2, 5, 20)


# -- position encodings ---------------------------------------------------------------------


def test_learnable_position_encoding_is_two_tables() -> None:
    torch.manual_seed(0)
    pe = LearnablePositionEncoding(dim=4, max_positions=10)
    pos = torch.tensor([[3, 7], [0, 9]])
    want = pe.x_embed.weight[[3, 0]] + pe.y_embed.weight[[7, 9]]
    torch.testing.assert_close(pe(pos), want)
    # one-hot over positions followed by a linear map gives the same numbers
    onehot = torch.nn.functional.one_hot(pos[:, 0], 10).float() @ pe.x_embed.weight
    torch.testing.assert_close(onehot, pe.x_embed.weight[[3, 0]])
    with pytest.raises(ValueError, match="max_positions"):
        pe(torch.tensor([[10, 0]]))


def test_sinusoidal_position_encoding_values() -> None:
    out = sinusoidal_1d(torch.tensor([0, 1]), 4)
    # channels: sin(p), cos(p), sin(p / 100), cos(p / 100)  (w_i = 10000^(-2i/4))
    want = [[0.0, 1.0, 0.0, 1.0], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]]
    torch.testing.assert_close(out, torch.tensor(want), atol=1e-6, rtol=0)
    pe = make_position_encoding("sinusoidal", 6)
    enc = pe(torch.tensor([[1, 2]]))
    torch.testing.assert_close(enc[:, :3], sinusoidal_1d(torch.tensor([1]), 3))  # x in the first half
    torch.testing.assert_close(enc[:, 3:], sinusoidal_1d(torch.tensor([2]), 3))  # y in the second
    assert sum(p.numel() for p in pe.parameters()) == 0  # fixed


def test_naive_and_no_position_encoding() -> None:
    torch.manual_seed(0)
    pe = NaivePositionEncoding(8)
    pos = torch.tensor([[10, 20], [12, 21], [14, 30]])
    # coordinates are min-max scaled within the batch: a translation changes nothing
    torch.testing.assert_close(pe(pos), pe(pos + 100))
    assert pe(pos).shape == (3, 8)
    none = make_position_encoding("none", 8)
    assert torch.equal(none(pos), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="position encoding"):
        make_position_encoding("rotary", 8)
