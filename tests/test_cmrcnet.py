"""CMRCNet specifics: mask ratio, residual cross-attention, reconstruction switches, token inputs."""

from __future__ import annotations

import math

import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods import create_method, get_method_class
from he2st.methods.cmrcnet import CMRCNetNet, ResidualCrossAttention, mask_features
from he2st.methods.nn.losses import contrastive_loss


def _net(**kw) -> CMRCNetNet:
    torch.manual_seed(0)
    args = dict(embed_dim=16, dropout=0.1, temperature=1.0, lam=0.5, reconstruction=True, mask_rate=0.5,
                recon_loss="mse", recon_target="image", recon_dim=16, gene_tokens=8, snn_dropout=0.25,
                cross_heads=4, fusion_heads=8, fusion_blocks=2, fusion_dropout=0.1)
    args.update(kw)
    return CMRCNetNet(12, 10, **args)


def test_defaults_are_the_papers() -> None:
    d = get_method_class("cmrcnet").defaults
    assert (d["encoder"], d["weights"], d["embed_dim"], d["dropout"]) == ("vit_b32", None, 256, 0.1)
    assert (d["mask_rate"], d["recon_loss"], d["recon_target"], d["recon_dim"], d["gene_tokens"]) == (0.5, "mse", "image", 256, 8)
    assert (d["snn_dropout"], d["cross_heads"], d["fusion_heads"], d["fusion_blocks"]) == (0.25, 4, 8, 2)
    assert (d["optimizer"], d["lr"], d["batch_size"], d["epochs"]) == ("adamw", 1e-4, 64, 60)
    assert (d["top_k"], d["select_metric"], d["aggregation"]) == (50, "cosine", "mean")
    assert (d["scheduler"], d["lr_min"], d["val_split"], d["val_fraction"]) == ("cosine", 1e-5, "spot_per_slide", 0.2)
    assert get_method_class("cmrcnet").capabilities.needs_tokens


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_mask_ratio(rate) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.ones(64, 50, 256)
    masked = mask_features(x, rate, g)
    frac = (masked == 0).float().mean().item()
    # 819,200 elements: the zeroed share is within 0.5 % of the rate; kept values are untouched
    assert abs(frac - rate) < 0.005
    assert set(masked.unique().tolist()) == {0.0, 1.0}
    # elements are masked independently (not whole tokens)
    per_token = (masked == 0).float().mean(dim=-1)
    assert per_token.min() > 0 and per_token.max() < 1
    assert torch.equal(mask_features(x, 0.0), x)
    with pytest.raises(ValueError):
        mask_features(x, 1.0)


def test_residual_cross_attention_value_from_image() -> None:
    torch.manual_seed(0)
    ca = ResidualCrossAttention(16, heads=4, dropout=0.0).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    q, k = ca.fc_q(x), ca.fc_k(y)
    h, dh = 4, 4
    qs, ks = q.view(2, 5, h, dh).transpose(1, 2), k.view(2, 3, h, dh).transpose(1, 2)
    vs = ca.v_context(k).view(2, 3, h, dh).transpose(1, 2)
    a = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    want = ca.v_image(q) + (a @ vs).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(ca(x, y), want, rtol=1e-5, atol=1e-5)


def test_loss_is_log1p_sum_and_switches() -> None:
    tokens, expr = torch.randn(6, 5, 12), torch.randn(6, 10)
    net = _net()
    net.eval()
    img, spot = net.embed_image(tokens), net.embed_expression(expr, None)
    lc = contrastive_loss(img, spot, targets="soft")
    torch.manual_seed(1)
    total = net.loss(tokens, expr, None)
    torch.manual_seed(1)
    lr = torch.nn.functional.mse_loss(net.reconstruct(tokens, expr), img)
    torch.testing.assert_close(total, torch.log1p(lc) + torch.log1p(lr))
    # image embedding is the projection of the token mean
    torch.testing.assert_close(img, net.image_projection(tokens.mean(dim=1)))
    # ablation: contrastive loss only (no reconstruction branch is built)
    plain = _net(reconstruction=False).eval()
    assert not hasattr(plain, "fusion")
    torch.testing.assert_close(plain.loss(tokens, expr, None),
                               contrastive_loss(plain.embed_image(tokens), plain.embed_expression(expr, None)))
    # reconstruct the expression embedding instead, with a cosine loss
    alt = _net(recon_target="expression", recon_loss="cosine")
    assert alt.reconstruct(tokens, expr).shape == (6, 16)
    assert len(net.fusion) == 2 and net.fusion[0] is not net.fusion[1]


def test_bad_parameters_and_encoders_without_tokens() -> None:
    with pytest.raises(He2stInputError, match="mask_rate"):
        create_method("cmrcnet", mask_rate=1.0)
    with pytest.raises(He2stInputError, match="recon_loss"):
        create_method("cmrcnet", recon_loss="l1")
    with pytest.raises(He2stInputError, match="recon_target"):
        create_method("cmrcnet", recon_target="both")
    with pytest.raises(He2stInputError, match="multiple"):
        create_method("cmrcnet", recon_dim=250)
    from he2st.datasets import synthetic

    c = synthetic(n_slides=2, n_spots=60, n_genes=12, patch_px=32, seed=3)
    m = create_method("cmrcnet", mode="finetune", encoder="color_stats", weights=None, patch_px=32, epochs=1)
    with pytest.raises(He2stInputError, match="tokens"):
        m.fit(c[:1], list(map(str, c[0].var_names)))
