"""Every registered method predicts an image-only slide (no genes, no counts) as it predicts the slide itself.

A slide that was never sequenced is what a trained model is for: spot methods predict it
patch by patch, slide methods over its spots (graphs, windows, attention), retrieval
methods against the bank they saved. One fit per method, on tiny settings.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import image_only

from he2st.data.slide import meta
from he2st.methods import create_method, list_methods

FEAT = {"encoder": "color_stats", "weights": None, "patch_px": 32}
SLIDE = {"patch_px": 32, "depth": 1, "heads": 2, "dim_head": 8, "epochs": 2, "lr": 1e-3}

#: The tiny settings of every registered method (a new method must add its own here);
#: ``name@variant`` is another configuration of ``name``.
CONFIGS: dict[str, dict] = {
    "mean": {},
    "ridge": {**FEAT, "alphas": [1.0, 100.0]},
    "knn": {**FEAT, "k": 5},
    "stnet": {**FEAT, "epochs": 2, "lr": 1e-3, "tta": False},
    "deepspace": {"encoder": "color_stats", "weights": None, "epochs": 2, "lr": 1e-3},
    "stimage": {**FEAT, "epochs": 2, "n_models": 2, "lr": 1e-2, "stain": "macenko"},
    "histogene": {**SLIDE, "dim": 32, "mlp_dim": 32},
    # Windows (3 x 3 spot pitches) and local attention: the large-slide path.
    "histogene@windows": {**SLIDE, "dim": 32, "mlp_dim": 32, "window_px": 96.0, "window_min_spots": 10,
                          "attention": "knn", "attention_k": 8},
    "hist2st": {**SLIDE, "patch_size": 8, "channel": 8, "gnn_depth": 1, "distill_views": 1},
    "thitogene": {**SLIDE, "stem_stride": 2, "caps": 4, "route_dim": 8, "gat_heads": 2, "mlp_dim": 32,
                  "gat_hidden": 16, "gat_out": 16, "head_hidden": 16},
    "hggep": {**SLIDE, "weights": None, "dim": 32, "stage_grid": 2, "mlp_dim": 32, "hyper_hidden": 16, "lstm_layers": 1,
              "distill_views": 1},
    "bleep": {**FEAT, "epochs": 2, "batch_size": 32, "top_k": 5},
    "mclstexp": {**FEAT, "epochs": 2, "batch_size": 32, "top_k": 5, "max_positions": 64},
    "cmrcnet": {"encoder": "convmixer", "weights": None, "patch_px": 32, "epochs": 1, "batch_size": 32, "top_k": 5,
                "embed_dim": 32, "recon_dim": 32},
    "spahgc": {**FEAT, "hidden": 16, "layers": 1, "epochs": 2, "lr": 1e-3, "top_k": 3},
    "eggn": {**FEAT, "hidden": 16, "layers": 1, "score_dim": 16, "epochs": 2, "lr": 1e-3, "top_k": 3},
    "m2ost": {"patch_px": 32, "token_px": 8, "embed_dim": 16, "depth": 1, "heads": 3, "head_dim": 8, "mlp_dim": 32,
              "epochs": 2, "lr": 1e-3, "augment": "none"},
    "triplex": {**FEAT, "target_input": "pooled", "n_neighbors": 3, "emb_dim": 16, "fusion_heads": 2, "global_heads": 2,
                "neighbor_heads": 2, "global_depth": 2, "neighbor_depth": 1, "epochs": 2, "lr": 1e-3, "batch_size": 32},
    "ensemble": {"method": "ridge", "n_members": 2, "params": {**FEAT, "alphas": [1.0]}},
    "stack": {"methods": [{"name": "ridge", "params": {**FEAT, "alphas": [1.0]}}, {"name": "knn", "params": {**FEAT, "k": 5}}],
              "smooth": "cv"},
    "smooth": {"method": "knn", "params": {**FEAT, "k": 5}},
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from he2st.datasets import synthetic

    return synthetic(n_slides=3, n_spots=40, n_genes=10, patch_px=32, seed=5, root=tmp_path_factory.mktemp("syn"))


def test_every_registered_method_has_a_config() -> None:
    names = {label.split("@")[0] for label in CONFIGS}
    assert set(list_methods()) <= names, sorted(set(list_methods()) - names)


@pytest.mark.filterwarnings("ignore::he2st.errors.RandomWeightsWarning")
@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_image_only_slide_predicts_like_the_slide(label: str, small) -> None:
    name = label.split("@")[0]
    if name not in list_methods():
        pytest.skip(f"{name} is not registered")
    genes = list(map(str, small[0].var_names))
    model = create_method(name, **CONFIGS[label]).fit(list(small[:2]), genes)
    test = small[2]
    bare = image_only(test)
    assert meta(bare).image_only and bare.n_vars == 0
    want = model.predict(test)
    got = model.predict(bare)
    assert got.shape == (test.n_obs, len(genes))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=label)
    if model.capabilities.uncertainty:
        np.testing.assert_allclose(model.predict_uncertainty(bare), model.predict_uncertainty(test), rtol=1e-5, atol=1e-5)
