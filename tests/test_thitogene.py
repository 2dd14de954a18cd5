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
from he2st.methods.thitogene import THItoGene, THItoGeneNet

# CPU budget: 32 px patches with a stride-2 stem, 4 capsules of 16 dims (64-d tokens),
# one ViT layer, lr 1e-3, 40 epochs. Two training slides are few: with torch's N(0, 1)
# position embeddings the network memorises positions (see the class docstring), so
# they start small; the Hist2ST views (grayscale/rotation/flip) regularise the capsules.
FAST = {
    "patch_px": 32, "stem_stride": 2, "caps": 4, "route_dim": 16, "depth": 1, "heads": 4, "dim_head": 16, "gat_heads": 2,
    "lr": 1e-3, "epochs": 40, "augment": "hist2st", "pos_init_std": 0.02,
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
    x = torch.rand(3, 3, 112, 112)
    caps = EfficientCapsNet(16, 28)(F.relu(ODConv2d(3, 16, 4, stride=4)(x)))
    assert caps.shape == (3, 20, 64)


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
