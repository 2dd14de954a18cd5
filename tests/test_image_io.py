"""he2st.image: header sizes, lazy region reads, pixel-format conversions, errors."""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from he2st.errors import He2stInputError, ImageError
from he2st.image import ImageConversionWarning, clear_image_cache, image_size, open_image
from he2st.image.lazy import cache as lazy_cache


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_pyramid(path: Path, data: np.ndarray, tile: int = 64, compression: str = "zlib") -> None:
    """A tiled pyramidal TIFF (SubIFDs), level k = data[::2**k, ::2**k]."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(tile, tile), subifds=2, compression=compression, photometric="rgb")
        for k in (1, 2):
            tw.write(data[:: 2**k, :: 2**k], tile=(tile, tile), subfiletype=1, compression=compression)


# ----------------------------------------------------------------------------- image_size


def test_image_size_her2st_matches_index(her2st_root: Path) -> None:
    index = pd.read_csv(her2st_root / "image_index.tsv", sep="\t")
    for row in index.itertuples():
        assert image_size(her2st_root / row.image) == (row.width_px, row.height_px)


def test_image_size_squidpy(squidpy_root: Path) -> None:
    assert image_size(squidpy_root / "test_img.jpg") == (950, 1717)


def test_image_size_tiff_png_and_errors(tmp_path: Path) -> None:
    data = _rgb(130, 200)
    _write_pyramid(tmp_path / "p.tif", data)
    Image.fromarray(data).save(tmp_path / "a.png")
    assert image_size(tmp_path / "p.tif") == (200, 130)
    assert image_size(tmp_path / "a.png") == (200, 130)

    with pytest.raises(ImageError, match="does not exist") as e:
        image_size(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(e.value)
    for name in ("fake.tif", "fake.jpg", "fake.png"):
        (tmp_path / name).write_text("gene\tcount\nERBB2\t12\n")
        with pytest.raises(ImageError, match=name):
            image_size(tmp_path / name)
        with pytest.raises(ImageError, match=name):
            open_image(tmp_path / name)
    with pytest.raises(ImageError, match="not a file"):
        image_size(tmp_path)
    assert issubclass(ImageError, He2stInputError)


# ----------------------------------------------------------------------------- TIFF


def test_pyramidal_tiff_region_equals_crop(tmp_path: Path) -> None:
    data = _rgb(300, 420, seed=1)
    _write_pyramid(tmp_path / "p.tif", data)
    with open_image(tmp_path / "p.tif") as img:
        assert (img.width, img.height) == (420, 300)
        assert img.levels == [(420, 300), (210, 150), (105, 75)]
        assert img.downsamples == [1.0, 2.0, 4.0]
        assert img.tile_size == (64, 64)
        rng = np.random.default_rng(0)
        for _ in range(20):
            w, h = rng.integers(1, 150, 2)
            x, y = rng.integers(0, 420 - w), rng.integers(0, 300 - h)
            np.testing.assert_array_equal(img.read_region(x, y, w, h), data[y : y + h, x : x + w])
        # level 1: x, y in level-0 pixels, size in level-1 pixels
        np.testing.assert_array_equal(img.read_region(100, 40, 50, 30, level=1), data[::2, ::2][20:50, 50:100])
        np.testing.assert_array_equal(img.read_region(0, 0, 105, 75, level=2), data[::4, ::4])


def test_region_padding_at_edges(tmp_path: Path) -> None:
    data = _rgb(100, 120, seed=2)
    _write_pyramid(tmp_path / "p.tif", data, tile=32)
    with open_image(tmp_path / "p.tif") as img:
        r = img.read_region(-10, -5, 40, 30)
        np.testing.assert_array_equal(r[5:, 10:], data[:25, :30])
        assert (r[:5] == 255).all() and (r[:, :10] == 255).all()
        r = img.read_region(100, 90, 40, 30)  # past the bottom-right corner
        np.testing.assert_array_equal(r[:10, :20], data[90:, 100:])
        assert (r[10:] == 255).all() and (r[:, 20:] == 255).all()
        assert (img.read_region(500, 500, 8, 8) == 255).all()  # fully outside
        with pytest.raises(ValueError, match="positive"):
            img.read_region(0, 0, 0, 5)
        with pytest.raises(ValueError, match="level 5"):
            img.read_region(0, 0, 5, 5, level=5)


def test_tiff_reads_touch_only_needed_tiles(tmp_path: Path) -> None:
    data = _rgb(512, 512, seed=3)
    _write_pyramid(tmp_path / "p.tif", data, tile=64)  # 8 x 8 tiles at level 0
    with open_image(tmp_path / "p.tif") as img:
        cache = img.backend.cache
        img.read_region(70, 70, 20, 20)  # inside tile (1, 1)
        assert len(cache) == 1
        img.read_region(120, 120, 16, 16)  # straddles tiles (1..2, 1..2): 3 new ones
        assert len(cache) == 4
        hits = cache.hits
        img.read_region(72, 72, 4, 4)  # tile (1, 1) again: no decode
        assert len(cache) == 4 and cache.hits == hits + 1


def test_strip_memmap_and_planar_tiffs(tmp_path: Path) -> None:
    data = _rgb(90, 110, seed=4)
    tifffile.imwrite(tmp_path / "strips.tif", data, rowsperstrip=16, compression="zlib")
    tifffile.imwrite(tmp_path / "raw.tif", data)  # uncompressed contiguous: memory-mapped
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(data, -1, 0), planarconfig="separate", photometric="rgb")
    for name in ("strips.tif", "raw.tif", "planar.tif"):
        with open_image(tmp_path / name) as img:
            np.testing.assert_array_equal(img.read_region(7, 13, 60, 50), data[13:63, 7:67], err_msg=name)
    with open_image(tmp_path / "raw.tif") as img:
        assert img.backend.levels[0].memmap is not None


def test_jpeg_compressed_tiff(tmp_path: Path) -> None:
    # smooth content so JPEG error is small and measurable
    yy, xx = np.mgrid[0:256, 0:256]
    data = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "j.tif", data, tile=(128, 128), compression="jpeg", photometric="rgb")
    with open_image(tmp_path / "j.tif") as img:
        r = img.read_region(100, 30, 60, 90).astype(int)
    assert np.abs(r - data[30:120, 100:160]).mean() < 2.0


# ----------------------------------------------------------------------------- conversions


def test_grayscale_and_16bit_tiff_convert_with_warning(tmp_path: Path) -> None:
    g8 = _rgb(40, 50)[..., 0]
    tifffile.imwrite(tmp_path / "g8.tif", g8, tile=(16, 16))
    with pytest.warns(ImageConversionWarning, match="grayscale replicated to RGB"):
        img = open_image(tmp_path / "g8.tif")
    r = img.read_region(0, 0, 50, 40)
    assert r.shape == (40, 50, 3)
    for c in range(3):
        np.testing.assert_array_equal(r[..., c], g8)

    rgb16 = np.array([[[0, 257, 65535], [32896, 1000, 65280]]], dtype=np.uint16)  # 1 x 2 px
    tifffile.imwrite(tmp_path / "c16.tif", rgb16, photometric="rgb")
    with pytest.warns(ImageConversionWarning, match=r"16-bit \(uint16\).*dtype's maximum \(65535 -> 255\)"):
        img = open_image(tmp_path / "c16.tif")
    # round(v * 255 / 65535): 0, 1, 255 | 128, 3.89 -> 4, 254
    np.testing.assert_array_equal(img.read_region(0, 0, 2, 1), [[[0, 1, 255], [128, 4, 254]]])


def test_png_modes_convert_with_warning(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (100, 50, 0, 0)  # transparent -> white
    rgba[0, 1] = (100, 50, 0, 255)  # opaque -> unchanged
    rgba[1, 0] = (100, 50, 0, 128)  # half: c*a + 255*(1-a), a = 128/255
    rgba[1, 1] = (0, 0, 0, 51)  # a = 0.2 -> 204
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with pytest.warns(ImageConversionWarning, match="alpha channel .* composited on white"):
        img = open_image(tmp_path / "a.png")
    r = img.read_region(0, 0, 2, 2)
    a = 128 / 255
    expected = [
        [[255, 255, 255], [100, 50, 0]],
        [[round(100 * a + 255 * (1 - a)), round(50 * a + 255 * (1 - a)), round(255 * (1 - a))], [204, 204, 204]],
    ]
    np.testing.assert_array_equal(r, expected)

    gray = np.array([[0, 128], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    with pytest.warns(ImageConversionWarning, match="grayscale"):
        r = open_image(tmp_path / "g.png").read_region(0, 0, 2, 2)
    np.testing.assert_array_equal(r, np.repeat(gray[..., None], 3, axis=-1))

    g16 = np.array([[0, 65535], [257 * 100, 1000]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with pytest.warns(ImageConversionWarning, match="converted to 8-bit"):
        r = open_image(tmp_path / "g16.png").read_region(0, 0, 2, 2)
    np.testing.assert_array_equal(r[..., 0], [[0, 255], [100, 4]])

    # plain RGB: no warning at all
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "rgb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_image(tmp_path / "rgb.png").close()


# ----------------------------------------------------------------------------- JPEG + LRU


def test_squidpy_jpeg_regions_decode_once(squidpy_root: Path) -> None:
    path = squidpy_root / "test_img.jpg"
    full = np.asarray(Image.open(path).convert("RGB"))
    clear_image_cache()
    before = lazy_cache.DECODE_COUNT["n"]
    with open_image(path) as img:
        assert (img.width, img.height) == (950, 1717) and img.reader == "pil"
        for x, y in [(0, 0), (400, 900), (800, 1600)]:
            np.testing.assert_array_equal(img.read_region(x, y, 100, 80), full[y : y + 80, x : x + 100][: 1717 - y])
    with open_image(path) as img2:  # a second handle reuses the decoded image
        img2.read_region(10, 10, 5, 5)
    assert lazy_cache.DECODE_COUNT["n"] == before + 1


def test_jpeg_thumbnail_without_full_decode(her2st_root: Path) -> None:
    path = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    clear_image_cache()
    before = lazy_cache.DECODE_COUNT["n"]
    with open_image(path) as img:
        th = img.thumbnail(512)
    assert lazy_cache.DECODE_COUNT["n"] == before  # DCT-domain downscale, not a full decode
    assert max(th.shape[:2]) == 512 and th.shape == (512, round(9274 * 512 / 9911), 3)
    # the slide is mostly white glass: its thumbnail is bright on average
    assert 200 < th.mean() < 250


def test_thumbnail_matches_block_average(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:400, 0:600]
    data = np.stack([xx * 255 // 599, yy * 255 // 399, np.full_like(xx, 128)], -1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "flat.tif", data, tile=(64, 64), compression="zlib")  # one level
    with open_image(tmp_path / "flat.tif") as img:
        th = img.thumbnail(150)
    assert th.shape == (100, 150, 3)
    ref = np.asarray(Image.fromarray(data).resize((150, 100), Image.Resampling.BOX)).astype(int)
    assert np.abs(th.astype(int) - ref).max() <= 3
    with open_image(tmp_path / "flat.tif") as img:
        np.testing.assert_array_equal(img.thumbnail(5000), data)  # small image: returned as is


def test_lazy_image_pickles_and_reopens(tmp_path: Path) -> None:
    data = _rgb(64, 64, seed=5)
    _write_pyramid(tmp_path / "p.tif", data, tile=32)
    img = open_image(tmp_path / "p.tif")
    img.read_region(0, 0, 8, 8)
    clone = pickle.loads(pickle.dumps(img))
    np.testing.assert_array_equal(clone.read_region(3, 4, 20, 10), data[4:14, 3:23])
    img.close()
    np.testing.assert_array_equal(img.read_region(0, 0, 4, 4), data[:4, :4])  # reopens after close


# ----------------------------------------------------------------------------- OpenSlide


def test_openslide_missing_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "slide.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails
    with pytest.raises(ImageError, match=r"needs OpenSlide.*he2st\[openslide\]"):
        open_image(tmp_path / "slide.svs")


def test_openslide_reads_generic_tiled_tiff(tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    data = _rgb(200, 300, seed=6)
    path = tmp_path / "slide.svs"  # a vendor extension routes to OpenSlide (generic tiled TIFF inside)
    tifffile.imwrite(path, data, tile=(64, 64), compression="zlib", photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # OpenSlide's RGBA is an API detail, not worth a warning
        img = open_image(path)
    assert img.reader == "openslide" and (img.width, img.height) == (300, 200)
    np.testing.assert_array_equal(img.read_region(10, 20, 50, 40), data[20:60, 10:60])
    r = img.read_region(280, 190, 40, 20)
    np.testing.assert_array_equal(r[:10, :20], data[190:, 280:])
    assert (r[10:] == 255).all()
    img.close()
