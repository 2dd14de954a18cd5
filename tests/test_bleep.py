"""BLEEP specifics: paper defaults, soft-target loss, the similarity-weighted option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods import create_method, get_method_class
from he2st.methods.bleep import BleepNet
from he2st.methods.nn.losses import contrastive_loss


def test_defaults_are_the_papers() -> None:
    d = get_method_class("bleep").defaults
    assert (d["encoder"], d["weights"], d["patch_px"], d["augment"]) == ("resnet50", "imagenet", 224, "bleep")
    assert (d["embed_dim"], d["dropout"], d["temperature"], d["targets"], d["lam"]) == (256, 0.1, 1.0, "soft", 0.5)
    assert (d["optimizer"], d["lr"], d["weight_decay"], d["batch_size"]) == ("adamw", 1e-3, 1e-3, 256)
    assert (d["top_k"], d["select_metric"], d["weight_metric"], d["aggregation"]) == (50, "cosine", None, "mean")
    assert get_method_class("bleep").capabilities.finetune


def test_net_uses_projection_heads_and_soft_targets() -> None:
    torch.manual_seed(0)
    net = BleepNet(6, 4, embed_dim=8, dropout=0.1, temperature=1.0, lam=0.5, targets="soft").eval()
    feats, expr = torch.randn(5, 6), torch.randn(5, 4)
    img, spot = net.image_projection(feats), net.spot_projection(expr)
    torch.testing.assert_close(net.loss(feats, expr, torch.zeros(5, 2)), contrastive_loss(img, spot, targets="soft"))
    hard = BleepNet(6, 4, embed_dim=8, dropout=0.1, temperature=1.0, lam=0.5, targets="hard").eval()
    hard.load_state_dict(net.state_dict())
    assert not torch.allclose(hard.loss(feats, expr, None), net.loss(feats, expr, None))


def test_similarity_weighted_option_and_bad_params() -> None:
    from he2st.datasets import synthetic

    c = synthetic(n_slides=3, n_spots=60, n_genes=12, patch_px=32, seed=3)
    genes = list(map(str, c[0].var_names))
    kw = dict(encoder="color_stats", weights=None, patch_px=32, epochs=5, batch_size=32, top_k=10)
    mean = create_method("bleep", **kw).fit(c[:2], genes)
    weighted = create_method("bleep", **kw, aggregation="softmax", weight_metric="l2").fit(c[:2], genes)
    # same training; prediction = softmax(-d^2)-weighted mean of the 10 nearest by COSINE (d: L2 distance)
    nb = weighted.weighting_neighbors(weighted.image_embeddings(c[2]), weighted.neighbors(c[2]))
    d2 = nb.distances.astype(np.float64) ** 2
    w = np.exp(-(d2 - d2.min(axis=1, keepdims=True)))
    w /= w.sum(axis=1, keepdims=True)
    want = np.einsum("qk,qkg->qg", w, np.asarray(weighted.bank_.values)[nb.indices])
    np.testing.assert_allclose(weighted.predict(c[2]), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(weighted.predict(c[2]), mean.predict(c[2]))
    with pytest.raises(He2stInputError, match="targets"):
        create_method("bleep", targets="fuzzy")
    with pytest.raises(He2stInputError, match="metric"):
        create_method("bleep", metric="hamming")
