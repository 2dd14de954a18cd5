"""M2OST (he2st.methods.m2ost) and its multi-level layers (he2st.methods.nn.multiscale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods import create_method, load_method
from he2st.methods.m2ost import M2OSTNet
from he2st.methods.nn.multiscale import (
    CrossLevelAttention,
    DeformablePatchEmbedding,
    LevelExcitation,
    window_tokens,
)
from _helpers import mean_pcc

TINY = dict(patch_px=32, token_px=8, embed_dim=24, depth=1, heads=3, head_dim=8, mlp_dim=48, batch_size=32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=80, n_genes=10, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))


def test_defaults_are_the_authors() -> None:
    p = create_method("m2ost").params
    # Dootmaan/M2OST: train_m2ost_example.py:14-16,25,40,43; model/M2OST.py:258,273; dataset/HBCDataset.py:30,77-90.
    assert (p["patch_px"], p["level_scales"], p["token_px"]) == (224, [1, 2, 4], 16)
    assert (p["embed_dim"], p["depth"], p["heads"], p["head_dim"], p["cross_heads"], p["mlp_dim"]) == (192, 4, 9, 64, 3, 384)
    assert (p["optimizer"], p["lr"], p["batch_size"], p["epochs"]) == ("adam", 1e-4, 48, 200)
    assert (p["mode"], p["encoder"], p["pool"], p["deform"], p["cross_residual"]) == ("finetune", None, "cls", False, False)
    assert p["dropout"] == p["emb_dropout"] == 0.0 and p["augment"] == "m2ost"


def test_window_tokens_without_offsets_are_plain_patches() -> None:
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8)
    tok = window_tokens(img, 4, 2)  # the centred 4 x 4 window in 2 x 2 patches: 4 tokens of 2*2*3 values
    assert tok.shape == (1, 4, 12)
    crop = img[0, :, 2:6, 2:6]  # (c, h, w)
    ref = crop.reshape(3, 2, 2, 2, 2).permute(1, 3, 2, 4, 0).reshape(4, 12)  # (gy gx) (py px c)
    torch.testing.assert_close(tok[0], ref, rtol=0, atol=1e-4)
    # By hand: token 0 starts at pixel (2, 2) of the red channel, then green, then blue.
    assert tok[0, 0, :3].tolist() == pytest.approx([18.0, 82.0, 146.0], abs=1e-4)
    # A whole-pixel offset reads the window shifted by that pixel.
    off = torch.tensor([1.0, 0.0]).expand(1, 4, 2)
    shifted = window_tokens(img, 4, 2, off)
    torch.testing.assert_close(shifted, window_tokens(torch.roll(img, -1, dims=-1), 4, 2), rtol=0, atol=1e-4)


def test_deformable_embedding_starts_as_the_plain_one() -> None:
    torch.manual_seed(0)
    plain = DeformablePatchEmbedding(4, dim=6, hidden=10)
    deform = DeformablePatchEmbedding(4, dim=6, hidden=10, deform=True)
    deform.embed.load_state_dict(plain.embed.state_dict())
    img = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(deform(img, 8), plain(img, 8))
    assert plain(img, 16).shape == (2, 16, 6) and plain(img, 8).shape == (2, 4, 6)
    assert plain.offsets(img, 8) is None
    assert torch.count_nonzero(deform.offsets(img, 8)) == 0
    # The offsets are trainable: a gradient reaches them.
    deform(img, 8).sum().backward()
    assert deform.offset.weight.grad is not None


def test_excitation_is_length_agnostic_and_permutation_invariant() -> None:
    torch.manual_seed(0)
    se = LevelExcitation(dim=4, n_levels=3, hidden=8).eval()
    c = torch.randn(3, 1, 1, 4)
    short = [c[i].expand(2, n, 4) for i, n in enumerate((1, 3, 5))]
    long = [c[i].expand(2, n, 4) for i, n in enumerate((7, 2, 11))]
    for a, b in zip(se.gates(short), se.gates(long)):
        torch.testing.assert_close(a, b)
    xs = [torch.randn(2, n, 4) for n in (5, 9, 13)]
    perm = [torch.randperm(x.shape[1]) for x in xs]
    out = se(xs)
    out_p = se([x[:, p] for x, p in zip(xs, perm)])
    for o, op, p in zip(out, out_p, perm):
        torch.testing.assert_close(o[:, p], op)
    # Hand value: a zero last layer gives gates sigmoid(0) = 0.5, so x -> 1.5 x.
    torch.nn.init.zeros_(se.net[4].weight)
    torch.nn.init.zeros_(se.net[4].bias)
    for x, y in zip(xs, se(xs)):
        torch.testing.assert_close(y, 1.5 * x)


def test_cross_level_attention_mixes_sequences_of_different_lengths() -> None:
    torch.manual_seed(0)
    ca = CrossLevelAttention(dim=6, n_levels=3, heads=2, head_dim=4).eval()
    xs = [torch.randn(2, n, 6) for n in (5, 9, 13)]
    out = ca(xs)
    assert [tuple(o.shape) for o in out] == [(2, 5, 6), (2, 9, 6), (2, 13, 6)]
    # By hand: when every token of levels 1 and 2 is the same, the softmax is uniform and
    # level 0 receives exactly their values, concatenated (level 1, then level 2) and projected.
    same = [xs[0], xs[1][:, :1].expand(2, 9, 6), xs[2][:, :1].expand(2, 13, 6)]
    y0 = ca(same)[0]
    v1 = ca.to_v[1](ca.norm(same[1][:, :1]))
    v2 = ca.to_v[2](ca.norm(same[2][:, :1]))
    ref = ca.to_out[0](torch.cat([v1, v2], dim=-1)).expand(2, 5, 6)
    torch.testing.assert_close(y0, ref, rtol=1e-5, atol=1e-5)
    ca_res = CrossLevelAttention(dim=6, n_levels=3, heads=2, head_dim=4, residual=True).eval()
    ca_res.load_state_dict(ca.state_dict())
    torch.testing.assert_close(ca_res(xs)[1], ca(xs)[1] + xs[1])


def test_network_token_plan_and_shapes() -> None:
    net = M2OSTNet(torch.nn.Linear(3 * 24, 5), image_px=32, token_px=8, embed_dim=24, depth=1, heads=3, head_dim=8,
                   mlp_dim=48)
    # Level l: l + 1 nested 4 x 4 grids, finest first (patch px, window px).
    assert net.plan == [[(8, 32)], [(4, 16), (8, 32)], [(2, 8), (4, 16), (8, 32)]]
    toks = net.tokens([torch.rand(2, 3, 32, 32) for _ in range(3)])
    assert [t.shape[1] for t in toks] == [17, 33, 49]
    assert net(torch.rand(2, 9, 32, 32)).shape == (2, 5)
    # The authors' 224 px / 16 px configuration: the finest window of level 3 is the central 56 px.
    big = M2OSTNet(torch.nn.Linear(3 * 6, 1), image_px=224, token_px=16, embed_dim=6, depth=1, heads=3, head_dim=2,
                   mlp_dim=6)
    assert big.plan[2] == [(4, 56), (8, 112), (16, 224)]
    assert [p.shape[1] for p in big.pos] == [197, 393, 589]  # model/M2OST.py:310-312


def test_levels_are_read_around_the_spot_at_growing_fields(cohort) -> None:
    from he2st.image import read_patches

    genes = list(cohort[0].var_names)
    s = cohort[0][:20].copy()
    m = create_method("m2ost", **TINY, epochs=1, val_fraction=0.0, augment="none").fit([s], genes)
    x = m._inputs(s)
    assert x.shape == (20, 32, 32, 9) and x.dtype == np.uint8
    mpp = float(s.uns["he2st"]["mpp"])
    assert m.patch_um_ == pytest.approx(32 * mpp)
    np.testing.assert_array_equal(x[..., 0:3], read_patches(s, size_px=32))
    for lv, scale in ((1, 2), (2, 4)):  # the lazy patch reader, one window per spot at scale x the field
        np.testing.assert_array_equal(x[..., 3 * lv : 3 * lv + 3], read_patches(s, size_px=32, target_mpp=scale * mpp))


def test_trains_and_beats_the_mean_predictor(cohort, tmp_path) -> None:
    genes = list(cohort[0].var_names)
    train, test = [cohort[0], cohort[1]], cohort[2]
    m = create_method("m2ost", normalization="log1p", **TINY, epochs=10, lr=1e-3).fit(train, genes)
    pred = m.predict(test)
    y = m.targets(test)
    base = create_method("mean", normalization="log1p").fit(train, genes).predict(test)
    assert mean_pcc(y, pred) > 0.1
    assert np.mean((pred - y) ** 2) < np.mean((base - y) ** 2)
    m2 = load_method(m.save(tmp_path / "m2ost"))
    np.testing.assert_allclose(m2.predict(test), pred, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "frozen"},
        {"level_scales": [2, 1]},
        {"level_scales": [1]},
        {"level_scales": ["a", "b"]},
        {"heads": 4},
        {"token_px": 5},
        {"token_px": 6, "patch_px": 36},  # 6 / 4 is not a whole pixel
        {"pool": "max"},
        {"dropout": 1.0},
        {"depth": 0},
    ],
)
def test_bad_parameters_raise(bad) -> None:
    with pytest.raises(He2stInputError):
        create_method("m2ost", **{**TINY, **bad})
