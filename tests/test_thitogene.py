"""THItoGene: dynamic convolution, capsules, learning on the synthetic cohort, persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from he2st.evaluate.metrics import evaluate_slide
from he2st.methods import create_method, load_method
from he2st.methods.nn.capsules import AttentionRouting, EfficientCapsNet, squash
from he2st.methods.nn.dynconv import ODConv2d
from he2st.methods.nn.transformer import count_parameters
from he2st.methods.thitogene import THItoGene, THItoGeneGAT, THItoGeneNet

# CPU budget: 32 px patches with a stride-2 stem, 4 capsules of 16 dims (+2 position
# capsules: 96-d tokens), one ViT layer, a 2 x 32 -> 32 GAT, lr 1e-3, 40 epochs. Two training slides are few: with torch's N(0, 1)
# position embeddings the network memorises positions (see the class docstring), so
# they start small; the Hist2ST views (grayscale/rotation/flip) regularise the capsules.
FAST = {
    "patch_px": 32, "stem_stride": 2, "caps": 4, "route_dim": 16, "depth": 1, "heads": 4, "dim_head": 16, "gat_heads": 2,
    "mlp_dim": 128, "gat_hidden": 32, "gat_out": 32, "head_hidden": 32, "lr": 1e-3, "epochs": 40, "augment": "hist2st", "pos_init_std": 0.02,
}


@pytest.fixture(scope="module")
def fitted(cohort, genes):
    return create_method("thitogene", **FAST).fit(cohort[:2], genes)


def test_module_sizes_match_the_authors_model() -> None:
    # The authors' model summary lists ODConv2d 3.8 K and EfficientCapsNet 317 K parameters.
    assert count_parameters(ODConv2d(3, 16, kernel_size=4, stride=4)) == 3815
    assert count_parameters(EfficientCapsNet(16, 28, n_caps=20, d_caps=64)) == 317_344
    d = THItoGene.defaults
    assert (d["caps"], d["route_dim"], d["depth"], d["heads"], d["gat_heads"]) == (20, 64, 4, 16, 8)
    assert (d["lr"], d["epochs"], d["patch_px"]) == (1e-5, 300, 112)
    with torch.device("meta"):
        net = THItoGeneNet(patch_px=112, n_genes=785)
    assert net.stem.stride == 4 and net.x_embed.weight.shape == (64, 64)
    assert len(net.vit.blocks) == 4 and net.gat.heads == 8
    # vis_model.py: tokens of (20 + 2) x 64, ViT MLP 2,048, GAT 8 x 1,024 -> 512, head 512 -> 1,024 -> genes.
    assert net.dim == 22 * 64 == 1408
    assert net.vit.blocks[0].mlp[0].out_features == 2048
    assert (net.gat.layer1.in_channels, net.gat.layer1.out_channels, net.gat.layer1.heads) == (1408, 1024, 8)
    assert (net.gat.layer2.in_channels, net.gat.layer2.out_channels) == (8192, 512)
    assert net.gat.layer1.negative_slope == 0.01 and net.gat.dropout.p == 0.2
    assert [m.normalized_shape for m in net.gene_head if isinstance(m, torch.nn.LayerNorm)] == [(1024,)]
    assert net.gene_head[0].in_features == 512 and net.gene_head[-1].out_features == 785
    assert (d["mlp_dim"], d["dropout"], d["graph_max_distance"], d["positions"]) == (2048, 0.2, None, "concat")
    x = torch.rand(3, 3, 112, 112)
    caps = EfficientCapsNet(16, 28)(F.relu(ODConv2d(3, 16, 4, stride=4)(x)))
    assert caps.shape == (3, 20, 64)


@pytest.mark.parametrize("positions, n_tokens", [("concat", 4 + 2), ("add", 4)])
def test_token_width_and_shapes(positions: str, n_tokens: int) -> None:
    torch.manual_seed(0)
    net = THItoGeneNet(
        32, 7, caps=4, route_dim=8, positions=positions, depth=1, heads=2, dim_head=8, mlp_dim=16, gat_heads=2,
        gat_hidden=8, gat_out=8, head_hidden=8, stride=2,
    ).eval()
    x, pos = torch.rand(5, 3, 32, 32), torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [2, 2]])
    tok = net.tokens(x, pos)
    assert net.dim == n_tokens * 8 and tok.shape == (5, n_tokens * 8)
    if positions == "concat":
        # The last two capsules are the x and y embeddings themselves.
        torch.testing.assert_close(tok[:, -16:-8], net.x_embed(pos[:, 0]))
        torch.testing.assert_close(tok[:, -8:], net.y_embed(pos[:, 1]))
    edges = torch.tensor([[1, 0, 3, 2, 3], [0, 1, 2, 3, 4]])
    assert net(x, pos, edges).shape == (5, 7)


def test_gat_has_no_self_loops() -> None:
    torch.manual_seed(0)
    gat = THItoGeneGAT(6, hidden=4, out=3, heads=2).eval()
    assert not gat.layer1.add_self_loops and not gat.layer2.add_self_loops
    # Spot 0 listens to spot 1, spots 1 and 2 to each other: nothing reaches spot 0's output
    # from its own features (two layers, no self loops), while its neighbour's neighbour's do.
    edges = torch.tensor([[1, 2, 1], [0, 1, 2]])
    x = torch.randn(3, 6)
    own, nbr = x.clone(), x.clone()
    own[0] += 5.0
    nbr[2] += 5.0
    torch.testing.assert_close(gat(x, edges), gat(own, edges))
    assert not torch.allclose(gat(x, edges)[0], gat(nbr, edges)[0])


def test_default_graph_is_unpruned(cohort, genes) -> None:
    m = create_method("thitogene", **FAST)
    assert m.params["graph_max_distance"] is None and m.params["neighbors"] == 4
    with pytest.raises(Exception, match="positions"):
        create_method("thitogene", positions="sum")


def test_squash_by_hand() -> None:
    out = squash(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    k = 1 - math.exp(-5.0)
    torch.testing.assert_close(out[0], torch.tensor([0.6 * k, 0.8 * k]))
    assert torch.equal(out[1], torch.zeros(2))
    caps = AttentionRouting(16, 8, 20, 64)(squash(torch.randn(5, 16, 8)))
    assert (caps.norm(dim=-1) < 1).all()


def test_odconv_applies_a_per_sample_kernel() -> None:
    torch.manual_seed(0)
    conv = ODConv2d(3, 4, kernel_size=3, stride=1, padding=1, kernel_num=4).eval()
    x = torch.rand(2, 3, 8, 8)
    out = conv(x)
    channel, filt, spatial, kernel = conv.attentions(x)
    assert torch.allclose(kernel.sum(1), torch.ones(2))
    for b in range(2):
        # The sample's own kernel: kernel-weighted bank, times spatial, input-channel and filter attention.
        w = torch.einsum("n,noikl->oikl", kernel[b], conv.weight) * spatial[b].view(1, 1, 3, 3)
        w = w * channel[b].view(1, 3, 1, 1) * filt[b].view(4, 1, 1, 1)
        torch.testing.assert_close(out[b : b + 1], F.conv2d(x[b : b + 1], w, padding=1), atol=1e-5, rtol=1e-5)
    # Different images get different kernels.
    assert not torch.allclose(kernel[0], kernel[1])


def test_beats_mean_on_held_out_slide(cohort, genes, fitted) -> None:
    mean = evaluate_slide(fitted.targets(cohort[2]), create_method("mean").fit(cohort[:2], genes).predict(cohort[2]), genes)
    ev = evaluate_slide(fitted.targets(cohort[2]), fitted.predict(cohort[2]), genes).as_dict()
    assert ev["n_nan(ACG)"] == 0 and ev["PCC(ACG)"] > 0.2
    assert ev["MSE(ACG)"] < mean.as_dict()["MSE(ACG)"]


def test_save_load_roundtrip(cohort, fitted, tmp_path) -> None:
    fitted.save(tmp_path / "m")
    loaded = load_method(tmp_path / "m")
    assert isinstance(loaded, THItoGene) and loaded.params == fitted.params
    np.testing.assert_array_equal(loaded.predict(cohort[2]), fitted.predict(cohort[2]))
