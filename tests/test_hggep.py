"""HGGEP: difference convolution, CBAM, spot hyperedges, the network, learning and persistence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from he2st.encoders import create_encoder
from he2st.errors import He2stInputError, RandomWeightsWarning
from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, load_method
from he2st.methods.hggep import HGGEP, HGGEPNet
from he2st.methods.nn.attention import ChannelSpatialAttention
from he2st.methods.nn.cdc import CentralDifferenceConv2d, GradientEnhancement
from he2st.methods.nn.hypergraph import HypergraphResidual, spot_hyperedges

# CPU budget: 32 px patches (stage maps pooled to 2 x 2), 64-wide features, one ViT
# layer each, a 2-layer LSTM, one distillation view, lr 2e-3, 14 epochs (held-out PCC(ACG) 0.29,
# MSE(ACG) 8.0 against the mean predictor's 8.8).
FAST = {
    "weights": None,
    "patch_px": 32, "dim": 64, "stage_grid": 2, "depth": 1, "heads": 2, "dim_head": 16, "mlp_dim": 64,
    "hyper_hidden": 32, "lstm_layers": 2, "distill_views": 1, "lr": 2e-3, "epochs": 14, "pos_init_std": 0.02,
}


@pytest.fixture(scope="module")
def fitted(cohort, genes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_method("hggep", **FAST).fit(cohort[:2], genes)


def test_difference_convolution_by_hand() -> None:
    torch.manual_seed(0)
    x = torch.full((1, 2, 9, 9), 3.0)
    pure = CentralDifferenceConv2d(2, 4, stride=1, theta=1.0)
    # A constant image has no gradient: zero away from the zero-padded border.
    assert torch.allclose(pure(x)[..., 1:-1, 1:-1], torch.zeros(1, 4, 7, 7), atol=1e-5)
    for kernel in ("cross", "full"):
        plain = CentralDifferenceConv2d(2, 4, stride=2, theta=0.0, kernel=kernel)
        y = torch.randn(1, 2, 10, 10)
        torch.testing.assert_close(plain(y), F.conv2d(y, plain.kernel3x3(), stride=2, padding=1))
    k = CentralDifferenceConv2d(1, 1, kernel="cross").kernel3x3()[0, 0]
    assert k[0, 0] == k[0, 2] == k[2, 0] == k[2, 2] == 0  # the cross has no corners
    # theta mixes in the centre term: out = conv - theta * x_centre * sum(w).
    half = CentralDifferenceConv2d(1, 1, theta=0.5)
    z = torch.randn(1, 1, 6, 6)
    expect = F.conv2d(z, half.kernel3x3(), padding=1) - 0.5 * z * half.weight.sum()
    torch.testing.assert_close(half(z), expect)


def test_strided_difference_convolution_trains_on_channels_last_input() -> None:
    # Regression: patches arrive as NHWC views; torch's CPU backward of a strided 1 x 1 convolution
    # on such an input (no gradient needed) corrupted the heap. Train a few steps on one and compare
    # every output and gradient with the contiguous input's.
    torch.manual_seed(0)
    a = CentralDifferenceConv2d(3, 4, stride=2, theta=0.7)
    b = CentralDifferenceConv2d(3, 4, stride=2, theta=0.7)
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 17, 17, 3).permute(0, 3, 1, 2)
    assert not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    for _ in range(3):
        out_a, out_b = a(x), b(x.contiguous())
        torch.testing.assert_close(out_a, out_b)
        for opt, out in ((opt_a, out_a), (opt_b, out_b)):
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
        torch.testing.assert_close(a.weight.grad, b.weight.grad)
    assert out_a.shape == (4, 4, 9, 9)
    gem = GradientEnhancement()
    y = gem(x)
    y.mean().backward()
    torch.testing.assert_close(y, gem(x.contiguous()))


def test_gem_and_cbam_shapes() -> None:
    assert GradientEnhancement()(torch.rand(2, 3, 112, 112)).shape == (2, 3, 58, 58)  # 56 + the 1 x 1's padding
    att = ChannelSpatialAttention(32)
    x = torch.rand(2, 32, 4, 4)
    out = att(x)
    assert out.shape == x.shape and (out.abs() <= x.abs() + 1e-6).all()  # sigmoid gates only shrink
    assert att.channel_mlp[0].out_channels == 2 and att.spatial.kernel_size == (7, 7)


def test_hyperedges_of_five_spots_by_hand() -> None:
    # A chain 0-1-2-3-4 (each spot listens to its chain neighbours) with 1-d features.
    f = torch.tensor([[0.0], [1.0], [2.0], [4.0], [10.0]])
    edges = torch.tensor([[1, 0, 2, 1, 3, 2, 4, 3], [0, 1, 1, 2, 2, 3, 3, 4]])
    h = spot_hyperedges(f, edges, k=1)
    # s_ij = a_ij / deg_i + d_ij / sum_j d_ij, two picks (k = 1), highest first.
    # Spot 0 (distances sum 17): neighbour 1 scores 1 + 1/17, spot 4 10/17.
    # Spot 1 (sum 14): spot 4 9/14, then the tie 0 / 2 (1/2 + 1/14 each) goes to the lower index.
    # Spot 2 (sum 13): neighbour 3 1/2 + 2/13, spot 4 8/13 beats neighbour 1's 1/2 + 1/13.
    # Spot 3 (sum 15): neighbour 4 1/2 + 6/15, neighbour 2 1/2 + 2/15.  Spot 4 (sum 33): 3, then 0 (10/33).
    picks = {int(i): [] for i in range(5)}
    for i, j in h.T.tolist():
        picks[i].append(j)
    assert picks[0] == [1, 4] and picks[1] == [4, 0] and picks[2] == [3, 4]
    assert picks[3] == [4, 2] and picks[4] == [3, 0]
    assert h.shape == (2, 10) and h[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # Incidence: hyperedge j holds the spots that picked j.
    inc = torch.zeros(5, 5, dtype=torch.long)
    inc[h[0], h[1]] = 1
    assert inc[:, 4].tolist() == [1, 1, 1, 1, 0] and inc[:, 0].tolist() == [0, 1, 0, 0, 1]
    # Chunked distances give the same picks.
    assert torch.equal(spot_hyperedges(f, edges, k=1, chunk=2), h)
    # Fewer spots than picks: every spot picks all.
    assert spot_hyperedges(f[:2], edges[:, :2], k=3).shape == (2, 4)
    out = HypergraphResidual(1, 4).eval()(f, h)
    assert out.shape == (5, 1)


def test_network_shapes_and_default_sizes() -> None:
    d = HGGEP.defaults
    assert (d["dim"], d["depth"], d["heads"], d["dim_head"], d["mlp_dim"], d["dropout"]) == (1024, 4, 16, 64, 1024, 0.2)
    assert (d["hyperedge_k"], d["hyper_hidden"], d["hyper_dropout"], d["lstm_layers"]) == (3, 512, 0.5, 4)
    assert (d["neighbors"], d["graph_max_distance"], d["zinb_weight"], d["distill_views"], d["distill_weight"]) == (
        8, 2.0, 0.25, 5, 0.5)
    assert (d["lr"], d["epochs"], d["patch_px"], d["cdc_theta"]) == (1e-5, 500, 112, 0.7)
    torch.manual_seed(0)
    bb = create_encoder("shufflenet_v2_x0_5").model
    net = HGGEPNet(7, bb, dim=64, stage_grid=2, depth=1, heads=2, dim_head=8, mlp_dim=32, hyper_hidden=16,
                   lstm_layers=2).eval()
    x = torch.rand(5, 3, 32, 32)
    pos = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [2, 2]])
    edges = torch.tensor([[1, 0, 3, 2, 3], [0, 1, 2, 3, 4]])
    assert [tuple(s.shape) for s in net.stages(x)] == [(5, 64)] * 3
    assert net(x, pos, edges).shape == (5, 7)
    # At 112 px the stage maps are the authors' 4 x 4: 192 and 1,024 channels.
    assert net.down4[0].channel_mlp[0].in_channels == 192 and net.down5[0].channel_mlp[0].in_channels == 1024
    assert len(net.vits) == 3 and net.jk.num_layers == 2
    ablated = HGGEPNet(7, create_encoder("shufflenet_v2_x0_5").model, dim=64, stage_grid=2, depth=1, heads=2,
                       dim_head=8, mlp_dim=32, gem=False, hypergraph=False, lstm_layers=1).eval()
    assert ablated.gem is None and ablated.hgnn is None and ablated(x, pos, edges).shape == (5, 7)


def test_bad_parameters() -> None:
    with pytest.raises(He2stInputError, match="divisible by stage_grid"):
        create_method("hggep", weights=None, dim=100)
    with pytest.raises(He2stInputError, match="cdc_kernel"):
        create_method("hggep", weights=None, cdc_kernel="star")
    with pytest.raises(He2stInputError, match="regclass"):
        create_method("hggep", weights=None, regclass=True)


@pytest.mark.parametrize("freeze", [False, True])
def test_random_backbone_warns_once(cohort, genes, freeze) -> None:
    # A trained random backbone is reported by HGGEP's fit, a frozen one by Method.fit: once either way.
    m = create_method("hggep", **{**FAST, "epochs": 1, "zinb_weight": 0, "distill_views": 0, "freeze_backbone": freeze})
    assert m.pretrained is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(cohort[:1], genes)
    random = [str(w.message) for w in caught if issubclass(w.category, RandomWeightsWarning)]
    assert len(random) == 1, random
    assert "shufflenet" in random[0].lower() and ("trained" in random[0]) is freeze


def test_beats_mean_on_held_out_slide(cohort, genes, fitted) -> None:
    mean = evaluate_slide(fitted.targets(cohort[2]), create_method("mean").fit(cohort[:2], genes).predict(cohort[2]), genes)
    ev = evaluate_slide(fitted.targets(cohort[2]), fitted.predict(cohort[2]), genes).as_dict()
    assert ev["n_nan(ACG)"] == 0 and ev["PCC(ACG)"] > 0.2, ev
    assert ev["MSE(ACG)"] < mean.as_dict()["MSE(ACG)"]
    fit = fitted.history_["train_fit"]
    assert fit["mse_model"] < fit["mse_mean_predictor"]


def test_save_load_roundtrip(cohort, fitted, tmp_path) -> None:
    fitted.save(tmp_path / "m")
    loaded = load_method(tmp_path / "m")
    assert isinstance(loaded, HGGEP) and loaded.params == fitted.params
    np.testing.assert_array_equal(loaded.predict(cohort[2]), fitted.predict(cohort[2]))
