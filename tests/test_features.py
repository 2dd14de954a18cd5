"""Feature extraction: preprocessing, obsm storage, the on-disk cache, invalidation, TTA, precision, tokens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from he2st._utils import default_cache_dir
from he2st.data.slide import make_slide
from he2st.encoders import create_encoder, extract_features, get_features, get_tokens, preprocess
from he2st.encoders.features import BF16_MIN_COSINE, UNS_KEY, resolve_precision, run_encoder
from he2st.errors import He2stInputError, SlideError

N_SPOTS = 12


def _he_array(h: int, w: int, n_nuclei: int, radius: tuple[float, float], seed: int = 0) -> np.ndarray:
    """An H&E-like RGB image (Beer-Lambert: haematoxylin nuclei over an eosin background)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    hema = np.zeros((h, w))
    for cy, cx, r in zip(rng.uniform(0, h, n_nuclei), rng.uniform(0, w, n_nuclei), rng.uniform(*radius, n_nuclei)):
        hema += 0.9 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    eosin = 0.3 + 0.2 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    od = hema[..., None] * np.array([0.65, 0.70, 0.29]) + eosin[..., None] * np.array([0.07, 0.99, 0.11])
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def he_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "he.png"
    Image.fromarray(_he_array(150, 190, 120, (2, 5))).save(path)
    return path


def _slide(image: Path, slide_id: str = "s1", shift: float = 0.0):
    xy = np.array([[30 + 40 * i + shift, 30 + 40 * j] for j in range(3) for i in range(4)], float)
    return make_slide(
        np.ones((N_SPOTS, 2)), [f"{slide_id}_{i}" for i in range(N_SPOTS)], ["g1", "g2"], xy,
        slide_id=slide_id, image_path=str(image), spot_diameter_px=20,
    )


class Counter:
    """Counts forward passes of an encoder (calls of the module)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def _cache_files(kind: str = "features") -> list[Path]:
    root = default_cache_dir() / "features"
    files = sorted(root.rglob("*.npy"))
    return [p for p in files if (p.parts[-3] == "tokens") == (kind == "tokens")]


# --------------------------------------------------------------------------- preprocess


def test_preprocess_scales_resizes_and_normalises():
    from he2st.encoders import EncoderInfo

    info = EncoderInfo("t", "t", 16, (0.5, 0.25, 0.0), (0.25, 0.5, 1.0), 1, False)
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    imgs[0] = 255
    x = preprocess(imgs, info)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    # (1 - mean) / std and (0 - mean) / std, per channel; a constant image stays constant when resized.
    torch.testing.assert_close(x[0, :, 5, 7], torch.tensor([2.0, 1.5, 1.0]))
    torch.testing.assert_close(x[1, :, 0, 0], torch.tensor([-2.0, -0.5, 0.0]))
    assert preprocess(imgs[0], info).shape == (1, 3, 16, 16)
    with pytest.raises(He2stInputError, match=r"uint8 RGB images \(N, H, W, 3\), got torch.float32"):
        preprocess(imgs.astype(np.float32), info)


# --------------------------------------------------------------------------- storage and cache


def test_features_are_stored_in_obsm_and_cached_on_disk(he_image):
    slide = _slide(he_image)
    enc = create_encoder("resnet18", input_size=64)
    calls = Counter(enc)
    X = get_features(slide, enc, patch_px=32, batch_size=5)
    assert X.shape == (N_SPOTS, 512) and X.dtype == np.float32 and np.isfinite(X).all()
    assert calls.n == math.ceil(N_SPOTS / 5)
    assert slide.obsm["X_resnet18"] is X or np.array_equal(slide.obsm["X_resnet18"], X)
    rec = slide.uns[UNS_KEY]["X_resnet18"]
    assert rec["encoder"] == "resnet18" and rec["patch_px"] == 32 and rec["tta"] is False and rec["stain"] == "none"
    assert rec["weights"].startswith("state-")  # a built encoder is identified by its tensors

    # Same settings again: served from obsm, no forward pass.
    assert np.array_equal(get_features(slide, enc, patch_px=32, batch_size=5), X)
    # A fresh copy of the slide without obsm: a pure read from the disk cache.
    fresh = _slide(he_image)
    assert np.array_equal(get_features(fresh, enc, patch_px=32, batch_size=7), X)  # batch size is not a setting
    assert calls.n == math.ceil(N_SPOTS / 5)
    (npy,) = _cache_files()
    assert npy.with_suffix(".json").is_file()
    assert not [p for p in npy.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_batching_and_workers_do_not_change_features(he_image):
    enc = create_encoder("resnet18", input_size=64)
    a = get_features(_slide(he_image), enc, patch_px=32, batch_size=12, num_workers=0, cache=False, precision="fp32")
    b = get_features(_slide(he_image), enc, patch_px=32, batch_size=5, num_workers=3, cache=False, precision="fp32")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_changing_any_setting_recomputes(he_image, tmp_path):
    from he2st.image.stain import StainNormalizer

    slide = _slide(he_image)
    base = create_encoder("resnet18", input_size=64)
    calls = Counter(base)
    X0 = get_features(slide, base, patch_px=32)
    n0 = calls.n
    rec0 = slide.uns[UNS_KEY]["X_resnet18"]["weights"]

    # Other weights (same architecture): another entry.
    other = create_encoder("resnet18", weights=create_encoder("resnet18", seed=9).save(tmp_path / "w.pth"), input_size=64)
    X1 = get_features(slide, other, patch_px=32)
    assert not np.allclose(X0, X1)
    assert slide.uns[UNS_KEY]["X_resnet18"]["weights"] != rec0

    # Patch size, stain normalisation, test-time augmentation: each recomputes with the base encoder.
    patches = np.asarray(__import__("he2st.image", fromlist=["extract_patches"]).extract_patches(slide, 32).images)
    reinhard = StainNormalizer("reinhard", min_tissue_pixels=10).fit(patches[:4])
    reinhard2 = StainNormalizer("reinhard", min_tissue_pixels=10).fit(patches[4:])
    results = {}
    for label, kw in {
        "patch": {"patch_px": 48}, "stain": {"patch_px": 32, "stain": reinhard},
        "stain2": {"patch_px": 32, "stain": reinhard2}, "tta": {"patch_px": 32, "tta": True},
    }.items():
        before = calls.n
        results[label] = get_features(slide, base, **kw)
        assert calls.n > before, label
        assert slide.uns[UNS_KEY]["X_resnet18"]["stain"] == ("none" if "stain" not in kw else kw["stain"].cache_key())
    assert not np.allclose(results["stain"], results["stain2"])
    assert len(_cache_files()) == 6
    # Back to the first settings: a disk-cache read, not a forward pass.
    before = calls.n
    assert np.array_equal(get_features(slide, base, patch_px=32), X0)
    assert calls.n == before and n0 == 1

    # The same Encoder object after its weights changed in place (fine-tuning): recomputed.
    with torch.no_grad():
        base.model.conv1.weight.mul_(-1.0)
    X2 = get_features(slide, base, patch_px=32)
    assert calls.n == before + 1 and not np.allclose(X2, X0)


def test_named_encoder_path_caches_per_weights_and_patch_size(he_image):
    slide = _slide(he_image)
    a = get_features(slide, "color_stats", patch_px=32)
    assert a.shape == (N_SPOTS, 30)
    assert slide.uns[UNS_KEY]["X_color_stats"]["weights"] == "no-weights"
    assert len(_cache_files()) == 1
    b = get_features(slide, "color_stats", patch_px=48)
    assert len(_cache_files()) == 2 and not np.allclose(a, b)
    c = get_features(_slide(he_image), "color_stats", patch_px=32)
    np.testing.assert_array_equal(a, c)


def test_h5ad_round_trip_keeps_the_record(he_image, tmp_path):
    import anndata as ad

    slide = _slide(he_image)
    enc = create_encoder("color_stats")
    get_features(slide, enc, patch_px=32)
    slide.write_h5ad(tmp_path / "s.h5ad")
    back = ad.read_h5ad(tmp_path / "s.h5ad")
    calls = Counter(enc)
    np.testing.assert_array_equal(get_features(back, enc, patch_px=32), slide.obsm["X_color_stats"])
    assert calls.n == 0


def test_tta_averages_the_eight_dihedral_symmetries(he_image):
    from he2st.image import extract_patches

    slide = _slide(he_image)
    enc = create_encoder("resnet18", input_size=64)  # random init: not rotation invariant
    calls = Counter(enc)
    tta = get_features(slide, enc, patch_px=32, tta=True, precision="fp32", batch_size=N_SPOTS, cache=False)
    assert calls.n == 8
    x = preprocess(np.asarray(extract_patches(slide, 32).images), enc.info)
    with torch.inference_mode():
        views = [enc(torch.rot90(x, k % 4, dims=(-2, -1)).flip(-1) if k >= 4 else torch.rot90(x, k, dims=(-2, -1)))
                 for k in range(8)]
    expected = torch.stack(views).mean(0).numpy()
    np.testing.assert_allclose(tta, expected, rtol=1e-4, atol=1e-5)
    plain = views[0].numpy()
    assert not np.allclose(tta, plain, rtol=1e-2, atol=1e-3)  # the encoder is not invariant, so TTA matters


# --------------------------------------------------------------------------- precision


HAS_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_auto_precision_policy():
    cpu = torch.device("cpu")
    for name in ("densenet121", "resnet18", "resnet50", "vgg16", "efficientnet_lite0"):
        assert resolve_precision("auto", name, cpu) == ("bf16" if HAS_BF16 else "fp32")
    for name in ("vit_b16", "uni", "ctranspath", "convmixer", "color_stats"):
        assert resolve_precision("auto", name, cpu) == "fp32"
    assert resolve_precision("fp32", "resnet50", cpu) == "fp32"
    assert resolve_precision("bf16", "vit_b16", cpu) == "bf16"  # explicit requests are honoured
    with pytest.raises(He2stInputError, match="precision must be one of"):
        resolve_precision("fp16", "resnet50", cpu)


def _bf16_vs_fp32(enc, images: np.ndarray) -> tuple[float, float]:
    f32 = run_encoder(enc, images, precision="fp32", batch_size=16)
    b16 = run_encoder(enc, images, precision="bf16", batch_size=16)
    cos = (f32 * b16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(b16, axis=1)
    rel = np.linalg.norm(f32 - b16, axis=1) / np.linalg.norm(f32, axis=1)
    return float(cos.min()), float(rel.max())


@pytest.mark.skipif(not HAS_BF16, reason="CPU without native bf16")
def test_bf16_channels_last_keeps_cnn_features_within_tolerance():
    import matplotlib
    from PIL import Image

    enc = create_encoder("efficientnet_lite0", weights="imagenet")
    big = _he_array(336, 336, 700, (3, 8), seed=1)
    he = np.stack([big[i : i + 224, j : j + 224] for i in (0, 112) for j in (0, 112)])  # native 224 px
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    photos = np.stack([np.asarray(photo.resize((224, 224)).rotate(r)) for r in (0, 30, 60, 90)])
    for images in (he, photos):
        cos, rel = _bf16_vs_fp32(enc, images)
        assert cos > BF16_MIN_COSINE and rel < 0.1, (cos, rel)
    # Random-init ImageNet CNNs (as used before fine-tuning) are well inside the tolerance.
    for name in ("densenet121", "resnet50"):
        cos, rel = _bf16_vs_fp32(create_encoder(name, input_size=64), he)
        assert cos > 0.999 and rel < 0.02, (name, cos, rel)


def test_channels_last_fp32_matches_contiguous_fp32(he_image):
    from he2st.image import extract_patches

    enc = create_encoder("densenet121", input_size=64)
    images = np.asarray(extract_patches(_slide(he_image), 64).images)
    with torch.inference_mode():
        plain = enc(preprocess(images, enc.info)).numpy()
    np.testing.assert_allclose(run_encoder(enc, images, precision="fp32"), plain, rtol=1e-4, atol=1e-5)
    # A model being fine-tuned is encoded in eval mode (BatchNorm statistics) and handed back in training mode.
    enc.train()
    np.testing.assert_allclose(run_encoder(enc, images, precision="fp32"), plain, rtol=1e-4, atol=1e-5)
    assert enc.training


# --------------------------------------------------------------------------- tokens and cohorts


def test_tokens_are_cached_as_float16(he_image):
    slide = _slide(he_image)
    enc = create_encoder("vit_b32")
    calls = Counter(enc.model.patch_embed)
    toks = get_tokens(slide, enc, patch_px=32, batch_size=6)
    assert toks.shape == (N_SPOTS, 50, 768) and toks.dtype == np.float16
    assert calls.n == 2
    (npy,) = _cache_files("tokens")
    again = get_tokens(_slide(he_image), enc, patch_px=32)
    assert calls.n == 2 and np.array_equal(np.asarray(again), toks)
    from he2st.image import extract_patches

    with torch.inference_mode():
        ref = enc.forward_tokens(preprocess(np.asarray(extract_patches(slide, 32).images[:2]), enc.info)).numpy()
    np.testing.assert_allclose(toks[:2].astype(np.float32), ref, rtol=2e-2, atol=2e-2)
    assert "X_vit_b32" not in slide.obsm  # tokens are not stored on the slide
    with pytest.raises(He2stInputError, match="has no tokens"):
        get_tokens(slide, "color_stats", patch_px=32)


def test_extract_features_builds_the_encoder_once_and_not_on_cache_hits(he_image, monkeypatch):
    import he2st.encoders._base as base

    built = []
    real = base.create_encoder
    monkeypatch.setattr(base, "create_encoder", lambda *a, **k: built.append(a) or real(*a, **k))
    slides = [_slide(he_image, "a"), _slide(he_image, "b", shift=3.0)]
    feats = extract_features(slides, "color_stats", patch_px=32)
    assert len(built) == 1 and [f.shape for f in feats] == [(N_SPOTS, 30)] * 2
    assert not np.allclose(feats[0], feats[1])  # shifted spots see other pixels
    again = extract_features([_slide(he_image, "a"), _slide(he_image, "b", shift=3.0)], "color_stats", patch_px=32)
    assert len(built) == 1  # all from the cache
    for f, g in zip(feats, again):
        np.testing.assert_array_equal(f, g)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_specific_errors(he_image):
    no_image = make_slide(np.ones((2, 1)), ["a", "b"], ["g"], np.array([[5.0, 5.0], [9.0, 9.0]]), slide_id="bare",
                          spot_diameter_px=4)
    with pytest.raises(SlideError, match="'bare'.*has no image"):
        get_features(no_image, "color_stats")
    slide = _slide(he_image)
    with pytest.raises(He2stInputError, match="fitted he2st.image.stain.StainNormalizer"):
        get_features(slide, "color_stats", stain="macenko")
    with pytest.raises(He2stInputError, match="weights= applies to an encoder name"):
        get_features(slide, create_encoder("color_stats"), weights="imagenet")
    with pytest.raises(He2stInputError, match="precision must be one of"):
        get_features(slide, "color_stats", precision="half")


@pytest.mark.realdata
def test_her2st_real_spots_bf16_tolerance_and_color_stats(her2st_root):
    import he2st

    (slide,) = he2st.datasets.her2st(root=her2st_root, sections=["C2"])
    if HAS_BF16:  # bf16 tolerance on real H&E spots, with real ImageNet weights
        from he2st.image import extract_patches

        spots = np.asarray(extract_patches(slide, 224).images[::20])
        cos, rel = _bf16_vs_fp32(create_encoder("efficientnet_lite0", weights="imagenet"), spots)
        assert cos > 0.995 and rel < 0.1, (cos, rel)
    X = get_features(slide, "color_stats", patch_px=224)
    assert X.shape == (slide.n_obs, 30) and np.isfinite(X).all()
    from he2st.encoders.stats import FEATURE_NAMES

    f = dict(zip(FEATURE_NAMES, X.T))
    # Spots sit on tissue: mostly stained, little glass; haematoxylin present everywhere.
    assert np.median(f["background_frac"]) < 0.5
    assert (f["H_mean"] > 0).all() and np.median(f["E_mean"]) > 0
