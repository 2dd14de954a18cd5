"""he2st.image.extract_patches, the patch cache, tissue fraction."""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from he2st.data.slide import make_slide
from he2st.errors import ImageError, SlideError
from he2st.image import (
    PatchCache,
    clear_image_cache,
    extract_patches,
    otsu_threshold,
    saturation,
    slide_tissue_threshold,
    tissue_fraction,
    tissue_mask,
)
from he2st.image import patches as patches_mod
from he2st.image.patches import _read_order, read_size_px

PINK = (200, 120, 170)  # eosin-like, saturation 0.4


def _slide(xy: np.ndarray, image: Path | str | None, names: list[str] | None = None, mpp: float | None = None, sid: str = "s1"):
    n = len(xy)
    names = names or [f"spot{i}" for i in range(n)]
    return make_slide(np.ones((n, 2)), names, ["g1", "g2"], np.asarray(xy, float), slide_id=sid,
                      image_path=None if image is None else str(image), spot_diameter_px=20.0, mpp=mpp)


def _her2st_slide(root: Path, sec: str):
    """A minimal slide of the spots that have counts (spot ids "XxY" as in ST-cnts)."""
    df = pd.read_csv(root / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")
    df.index = [f"{x}x{y}" for x, y in zip(df.x, df.y, strict=True)]
    with gzip.open(root / "ST-cnts" / f"{sec}.tsv.gz", "rt") as fh:
        counted = pd.Index([line.split("\t", 1)[0] for line in fh][1:])  # first column, header skipped
    df = df.loc[df.index.intersection(counted)]
    img = glob.glob(str(root / "ST-imgs" / "C" / sec / "*.jpg"))[0]
    names = list(df.index)
    return _slide(df[["pixel_x", "pixel_y"]].to_numpy(), img, names, mpp=0.69, sid=sec)


# ----------------------------------------------------------------------------- tissue measure


def test_saturation_otsu_and_tissue_fraction_by_hand() -> None:
    px = np.array([[[255, 255, 255], [200, 100, 150], [0, 0, 0], [100, 100, 50]]], dtype=np.uint8)
    np.testing.assert_allclose(saturation(px), [[0.0, 0.5, 0.0, 0.5]])
    # bimodal values: Otsu cuts between the modes
    v = np.r_[np.full(700, 0.05), np.full(300, 0.45)]
    t = otsu_threshold(v)
    assert 0.05 < t < 0.45
    assert np.isnan(otsu_threshold(np.full(10, 0.3)))
    # half white, half pink patch -> 0.5; blank -> 0; all pink -> 1
    img = np.full((3, 8, 8, 3), 255, np.uint8)
    img[0, :, :4] = PINK
    img[2] = PINK
    np.testing.assert_allclose(tissue_fraction(img, threshold=0.1), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(tissue_fraction(img, threshold=0.1, block=4), [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(tissue_mask(img, 0.7, threshold=0.1), [False, False, True])
    np.testing.assert_array_equal(tissue_mask(np.array([0.69, 0.7, 1.0]), 0.7), [False, True, True])
    with pytest.raises(ValueError, match="min_fraction"):
        tissue_mask(np.array([0.5]), 1.5)


def test_slide_threshold_separates_glass_from_pale_tissue() -> None:
    rng = np.random.default_rng(0)
    thumb = np.full((100, 100, 3), (238, 222, 236), np.float64)  # pink-tinted glass, s ~ 0.07
    # 30 % tissue: a continuum from pale stroma (s ~ 0.16) to nuclei-rich (s ~ 0.6)
    mix = rng.uniform(0, 1, (30, 100, 1))
    thumb[:30] = (1 - mix) * np.array([225, 190, 215]) + mix * np.array([120, 60, 160])
    thumb = np.clip(thumb + rng.normal(0, 1.5, thumb.shape), 0, 255).astype(np.uint8)
    assert saturation(thumb[30:]).max() < 0.1 and saturation(thumb[:30]).min() > 0.13
    t = slide_tissue_threshold(thumb)
    assert np.percentile(saturation(thumb[30:]), 99.5) < t < saturation(thumb[:30]).min()
    np.testing.assert_allclose(tissue_fraction(thumb[None], t), [0.30], atol=0.01)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_her2st_patch_centres_on_tissue(her2st_root: Path) -> None:
    """Every C2-C6 spot (910) gets a patch; their centres lie on tissue."""
    total = 0
    for sec in ["C2", "C3", "C4", "C5", "C6"]:
        slide = _her2st_slide(her2st_root, sec)
        p = extract_patches(slide, size_px=224, cache=False)
        n = slide.n_obs
        total += n
        assert p.images.shape == (n, 224, 224, 3) and p.images.dtype == np.uint8
        assert list(p.obs_names) == list(slide.obs_names) and p.slide_id == sec and p.mpp == 0.69
        # Hist2ST crop convention on integer centres: img[y-112:y+112, x-112:x+112]
        full = np.asarray(Image.open(slide.uns["he2st"]["image_path"]).convert("RGB")) if sec == "C2" else None
        if full is not None:
            xy = np.floor(slide.obsm["spatial"]).astype(int)
            for i in (0, n // 2, n - 1):
                x, y = xy[i]
                np.testing.assert_array_equal(p.images[i], full[y - 112 : y + 112, x - 112 : x + 112])
        centre = tissue_fraction(np.asarray(p.images)[:, 40:184, 40:184], p.tissue_threshold, block=p.tissue_block)
        assert centre.min() > 0.15, (sec, centre.min())  # no spot sits on glass
        assert np.percentile(centre, 5) > 0.5, sec
        assert np.median(centre) > 0.9, sec
        assert np.median(p.tissue_fraction) > 0.9
        # a patch of glass from the slide's corner scores ~0 with the same threshold
        with _open(slide) as img:
            glass = img.read_region(150, 150, 224, 224)
        assert tissue_fraction(glass, p.tissue_threshold, block=p.tissue_block) < 0.05
    assert total == 910


def _open(slide):
    from he2st.image import open_image

    return open_image(slide.uns["he2st"]["image_path"])


@pytest.mark.realdata
def test_squidpy_patches_edges_padded(squidpy_root: Path) -> None:
    import anndata as ad

    raw = ad.read_h5ad(squidpy_root / "test_data.h5ad")
    xy = np.asarray(raw.obsm["spatial"], float)
    img_path = squidpy_root / "test_img.jpg"
    xy = np.vstack([xy, [[3.0, 5.0], [949.0, 1716.0]]])  # two spots at the image corners
    slide = _slide(xy, img_path, mpp=0.62)
    p = extract_patches(slide, size_px=64, cache=False)
    assert p.images.shape == (51, 64, 64, 3)  # nothing dropped
    full = np.asarray(Image.open(img_path).convert("RGB"))
    corner = p.images[49]  # centre (3, 5): top-left at (-29, -27)
    np.testing.assert_array_equal(corner[27:, 29:], full[:37, :35])
    assert (corner[:27] == 255).all() and (corner[:, :29] == 255).all()
    far = p.images[50]  # centre (949, 1716): top-left (917, 1684)
    np.testing.assert_array_equal(far[:33, :33], full[1684:, 917:])
    assert (far[33:] == 255).all() and (far[:, 33:] == 255).all()
    assert np.median(p.tissue_fraction[:49]) > 0.8


# ----------------------------------------------------------------------------- synthetic slides


@pytest.fixture()
def synth(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 600 x 500 tiled TIFF: white glass with pink tissue blocks and a unique colour per 10 px cell."""
    rng = np.random.default_rng(0)
    data = np.full((500, 600, 3), 255, np.uint8)
    data[100:400, 100:500] = PINK
    data[100:400, 100:500, 2] = rng.integers(150, 190, (300, 400))
    path = tmp_path / "synth.tif"
    tifffile.imwrite(path, data, tile=(64, 64), compression="zlib", photometric="rgb")
    return path, data


def test_patches_follow_obs_order_and_crop(synth: tuple[Path, np.ndarray]) -> None:
    path, data = synth
    rng = np.random.default_rng(1)
    xy = np.c_[rng.uniform(0, 600, 40), rng.uniform(0, 500, 40)]
    slide = _slide(xy, path)
    p = extract_patches(slide, size_px=32, cache=False)
    padded = np.pad(data, ((16, 48), (16, 48), (0, 0)), constant_values=255)
    for i, (x, y) in enumerate(np.floor(xy).astype(int)):
        np.testing.assert_array_equal(p.images[i], padded[y : y + 32, x : x + 32])
    inside = (xy[:, 0] > 130) & (xy[:, 0] < 470) & (xy[:, 1] > 130) & (xy[:, 1] < 370)
    outside = (xy[:, 0] < 70) | (xy[:, 0] > 530) | (xy[:, 1] < 70) | (xy[:, 1] > 430)
    assert (p.tissue_fraction[inside] == 1.0).all() and (p.tissue_fraction[outside] == 0.0).all()


def test_read_order_groups_tile_rows() -> None:
    tops = np.array([300, 10, 250, 20, 5])
    lefts = np.array([0, 90, 5, 10, 500])
    order = _read_order(tops, lefts, tile_h=256)
    assert list(order) == [2, 3, 1, 4, 0]  # tile row 0 (tops < 256) by x, then tile row 1


def test_patch_cache_hit_miss_and_invalidation(synth: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = synth
    xy = np.array([[200.0, 200.0], [300.0, 250.0], [590.0, 10.0]])
    slide = _slide(xy, path)
    cache = PatchCache(tmp_path / "cache")
    a = extract_patches(slide, size_px=48, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1) and not a.from_cache
    b = extract_patches(slide, size_px=48, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1) and b.from_cache
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.tissue_fraction, b.tissue_fraction)
    assert isinstance(b.images, np.memmap) and not b.images.flags.writeable
    assert list(b.obs_names) == list(slide.obs_names)

    # a fresh instance (another process, a later run) and a fresh hash memo still hit
    patches_mod._HASH_MEMO.clear()
    other = PatchCache(tmp_path / "cache")
    extract_patches(slide, size_px=48, cache=other)
    assert (other.hits, other.misses) == (1, 0)
    assert len(list((tmp_path / "cache" / "hashes").glob("*.txt"))) == 1

    # changing the size, the coordinates or the names invalidates
    extract_patches(slide, size_px=40, cache=cache)
    assert cache.misses == 2
    moved = _slide(xy + 1.0, path)
    extract_patches(moved, size_px=48, cache=cache)
    assert cache.misses == 3
    renamed = _slide(xy, path, names=["a", "b", "c"])
    extract_patches(renamed, size_px=48, cache=cache)
    assert cache.misses == 4

    # a damaged entry is rebuilt, not trusted
    key = cache.key(slide, 48, None)
    img_p, _, meta_p = cache._paths(key)
    # (replace, not overwrite in place: `a.images` maps the old file and must stay valid)
    np.save(tmp_path / "bad.npy", np.zeros((1, 2, 3), np.uint8))
    os.replace(tmp_path / "bad.npy", img_p)
    c = extract_patches(slide, size_px=48, cache=cache)
    assert not c.from_cache and cache.misses == 5
    np.testing.assert_array_equal(c.images, a.images)
    assert json.loads(meta_p.read_text())["n"] == 3


def test_default_cache_lives_under_he2st_cache(synth: tuple[Path, np.ndarray], monkeypatch, tmp_path: Path) -> None:
    path, _ = synth
    monkeypatch.setenv("HE2ST_CACHE", str(tmp_path / "root"))
    slide = _slide(np.array([[200.0, 200.0]]), path)
    assert not extract_patches(slide, size_px=16).from_cache
    assert extract_patches(slide, size_px=16).from_cache
    assert len(list((tmp_path / "root" / "patches").glob("??/*.images.npy"))) == 1


def test_changed_image_file_invalidates(tmp_path: Path) -> None:
    data = np.full((100, 100, 3), 255, np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(data).save(path)
    slide = _slide(np.array([[50.0, 50.0]]), path)
    cache = PatchCache(tmp_path / "c")
    assert extract_patches(slide, 16, cache=cache).images.mean() == 255
    data[:] = 0
    Image.fromarray(data).save(path)
    os.utime(path, ns=(1, 1))  # new content with a new mtime

    clear_image_cache()
    again = extract_patches(slide, 16, cache=cache)
    assert not again.from_cache and again.images.mean() == 0


def test_target_mpp_field_of_view(tmp_path: Path) -> None:
    # a 40 px black square in white, image at 0.5 um/px: 20 um across
    data = np.full((400, 400, 3), 255, np.uint8)
    data[180:220, 180:220] = 0
    path = tmp_path / "sq.tif"
    with tifffile.TiffWriter(path) as tw:  # pyramidal: level 1 is exactly 2x
        tw.write(data, tile=(64, 64), subifds=1, compression="zlib", photometric="rgb")
        tw.write(data[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib")
    slide = _slide(np.array([[200.0, 200.0]]), path, mpp=0.5)
    native = extract_patches(slide, size_px=64, cache=False)
    assert native.read_px == 64 and native.mpp == 0.5
    assert (native.images[0, 12:52, 12:52] == 0).all()  # 40 px square
    coarse = extract_patches(slide, size_px=64, target_mpp=1.0, cache=False)
    assert coarse.read_px == 128 and coarse.mpp == 1.0  # 64 px x 1 um = 128 px x 0.5 um
    dark = (coarse.images[0].mean(-1) < 128).sum(axis=0)
    assert dark.max() == 20 and (dark > 0).sum() == 20  # the square is now 20 px: half the size
    fine = extract_patches(slide, size_px=64, target_mpp=0.25, cache=False)
    assert fine.read_px == 32 and ((fine.images[0].mean(-1) < 128).all())  # zoomed into the square
    assert read_size_px(224, 0.5, 0.69) == round(224 * 0.5 / 0.69)

    with pytest.raises(SlideError, match="mpp.*unknown"):
        extract_patches(_slide(np.array([[200.0, 200.0]]), path), size_px=64, target_mpp=1.0)
    with pytest.raises(ValueError, match="target_mpp"):
        extract_patches(slide, size_px=64, target_mpp=-1.0)


def test_missing_image_errors(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="no image"):
        extract_patches(_slide(np.array([[1.0, 1.0]]), None))
    with pytest.raises(ImageError, match="does not exist"):
        extract_patches(_slide(np.array([[1.0, 1.0]]), tmp_path / "gone.tif"))
