"""mclSTExp specifics: defaults, the spot "sentence", position-encoding switches, retrieval defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods import create_method, get_method_class
from he2st.methods.mclstexp import MclSTExpNet


def _net(position: str = "learnable") -> MclSTExpNet:
    torch.manual_seed(0)
    return MclSTExpNet(6, 20, embed_dim=8, dropout=0.0, temperature=1.0, lam=0.5, targets="hard",
                       position=position, max_positions=50, layers=2, heads=8, head_dim=64).eval()


def test_defaults_are_the_papers() -> None:
    d = get_method_class("mclstexp").defaults
    assert (d["encoder"], d["embed_dim"], d["layers"], d["heads"], d["head_dim"]) == ("densenet121", 256, 2, 8, 64)
    assert (d["position"], d["max_positions"], d["targets"], d["lam"], d["temperature"]) == ("learnable", 65536, "hard", 0.5, 1.0)
    assert (d["optimizer"], d["lr"], d["weight_decay"], d["batch_size"], d["epochs"]) == ("adamw", 1e-4, 1e-3, 128, 90)
    # Paper "Inference" and eq. 14-16: cosine top k, inverse squared Euclidean weights; 32 spots per bank chunk.
    assert (d["top_k"], d["select_metric"], d["weight_metric"], d["aggregation"]) == (200, "cosine", "l2", "inverse_square")
    assert d["bank_chunk"] == 32
    assert get_method_class("mclstexp").capabilities.needs_positions


def test_spots_of_a_batch_form_one_sentence() -> None:
    net = _net()
    expr, pos = torch.randn(4, 20), torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    full = net.embed_expression(expr, pos)
    # A spot's embedding depends on the other words of its sentence (self-attention) ...
    alone = net.embed_expression(expr[:1], pos[:1])
    assert not torch.allclose(full[:1], alone)
    # ... but not on their order (no positional mixing beyond the added encodings).
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(net.embed_expression(expr[perm], pos[perm]), full[perm], rtol=1e-5, atol=1e-5)
    # and on its own position through the learnable tables
    moved = pos.clone()
    moved[0] = torch.tensor([9, 9])
    assert not torch.allclose(net.embed_expression(expr, moved)[0], full[0])
    # the transformer is pre-norm with an inner attention width of 8 x 64 = 512 on 20-d tokens
    attn = net.spot_encoder[0].attn
    assert attn.to_q.out_features == 512 and attn.to_out.out_features == 20


@pytest.mark.parametrize("position", ["none", "sinusoidal", "naive", "learnable"])
def test_every_position_switch_trains(position) -> None:
    from he2st.datasets import synthetic

    c = synthetic(n_slides=3, n_spots=60, n_genes=12, patch_px=32, seed=3)
    genes = list(map(str, c[0].var_names))
    m = create_method("mclstexp", encoder="color_stats", weights=None, patch_px=32, epochs=3, batch_size=32,
                      lr=1e-3, top_k=10, position=position, max_positions=64).fit(c[:2], genes)
    assert np.isfinite(m.predict(c[2])).all()
    n_tables = sum(p.numel() for n, p in m.net_.named_parameters() if n.startswith("position."))
    assert n_tables == {"none": 0, "sinusoidal": 0, "naive": 3 * 12 + 2 * 12, "learnable": 2 * 64 * 12}[position]


def test_position_table_too_small_is_a_clear_error() -> None:
    from he2st.datasets import synthetic

    c = synthetic(n_slides=2, n_spots=60, n_genes=12, patch_px=32, seed=3)
    genes = list(map(str, c[0].var_names))
    m = create_method("mclstexp", encoder="color_stats", weights=None, patch_px=32, epochs=1, max_positions=3)
    with pytest.raises(He2stInputError, match="max_positions"):
        m.fit(c[:1], genes)
    with pytest.raises(He2stInputError, match="position"):
        create_method("mclstexp", position="rotary")
