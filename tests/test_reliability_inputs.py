"""Issue 13: no silent wrong results, no raw tracebacks, safe on hostile files.

Each test reproduces one failure seen before the fix: a truncated JPEG read as
grey, a decompression bomb, raw EOFError/KeyError/JSONDecodeError, a full disk.
"""

from __future__ import annotations

import errno
import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from he2st.errors import DiskFullError, He2stInputError, ImageError


def _jpeg(path: Path, side: int = 200) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(path, quality=90)
    return path


# -- images ---------------------------------------------------------------------------


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path: Path) -> None:
    from he2st.image import open_image

    data = _jpeg(tmp_path / "full.jpg").read_bytes()
    half = tmp_path / "half.jpg"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="half.jpg.*truncated"):
        open_image(half).read_region(0, 150, 40, 40)


def test_truncated_jpeg_opt_in_loads_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    from he2st.image import open_image

    data = _jpeg(tmp_path / "full.jpg").read_bytes()
    half = tmp_path / "half2.jpg"
    half.write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("HE2ST_ALLOW_TRUNCATED_IMAGES", "1")
    with pytest.warns(UserWarning, match="truncated"):
        region = open_image(half).read_region(0, 150, 40, 40)
    assert region.shape == (40, 40, 3)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the opt-in never leaks to the process


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR is patched to declare ``width x height`` (CRC fixed)."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_png_is_refused_before_decoding(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    from he2st.image import image_size, open_image

    bomb = _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 20_000
    assert image_size(bomb) == (100_000, 100_000)  # header reads still work
    with pytest.raises(ImageError, match=r"bomb.png.*100000 x 100000.*HE2ST_MAX_DECODED_PIXELS"):
        open_image(bomb)
    assert PILImage.MAX_IMAGE_PIXELS is not None  # Pillow's own guard stays on for the process


def test_decoded_pixel_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from he2st.image import open_image

    path = _jpeg(tmp_path / "small.jpg", side=64)
    monkeypatch.setenv("HE2ST_MAX_DECODED_PIXELS", "1000")
    with pytest.raises(ImageError, match="4,096 pixels.*1,000"):
        open_image(path)
    monkeypatch.setenv("HE2ST_MAX_DECODED_PIXELS", "1e4")
    assert open_image(path).read_region(0, 0, 8, 8).shape == (8, 8, 3)


def test_jpeg_larger_than_the_cache_decodes_once_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from he2st.image import open_image
    from he2st.image.lazy import cache as lazy_cache

    path = _jpeg(tmp_path / "big.jpg", side=300)
    expected = np.asarray(Image.open(path).convert("RGB"))
    monkeypatch.setattr(lazy_cache.DECODED, "max_bytes", 1000)  # smaller than the image
    before = lazy_cache.DECODE_COUNT["n"]
    with open_image(path) as img:
        regions = [img.read_region(x, x, 32, 32) for x in range(0, 250, 25)]
    with open_image(path) as img:  # a new handle maps the same decoded file
        again = img.read_region(10, 20, 32, 32)
    assert lazy_cache.DECODE_COUNT["n"] == before + 1
    for x, r in zip(range(0, 250, 25), regions, strict=True):
        np.testing.assert_array_equal(r, expected[x : x + 32, x : x + 32])
    np.testing.assert_array_equal(again, expected[20:52, 10:42])


# -- readers: damaged compressed / binary inputs ---------------------------------------


def _truncated_gzip(path: Path, text: str) -> Path:
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_gzip_counts_st_legacy(tmp_path: Path) -> None:
    from he2st.io import read_st_legacy

    header = "\t" + "\t".join(f"G{i}" for i in range(200))
    rows = [f"{x}x{y}\t" + "\t".join("3" for _ in range(200)) for x in range(1, 20) for y in range(1, 20)]
    counts = _truncated_gzip(tmp_path / "S1.tsv.gz", "\n".join([header, *rows]))
    spots = tmp_path / "S1_selection.tsv"
    spots.write_text("x\ty\tpixel_x\tpixel_y\n1\t1\t10\t10\n1\t2\t10\t20\n2\t1\t20\t10\n")
    with pytest.raises(He2stInputError, match="S1.tsv.gz"):
        read_st_legacy(counts, spots)


def test_truncated_gzip_mtx_visium(tmp_path: Path) -> None:
    from he2st.io.visium import read_10x_mtx

    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    entries = "\n".join(f"{i % 50 + 1} {i % 30 + 1} {i % 7 + 1}" for i in range(3000))
    _truncated_gzip(folder / "matrix.mtx.gz", f"%%MatrixMarket matrix coordinate integer general\n50 30 3000\n{entries}\n")
    (folder / "barcodes.tsv").write_text("\n".join(f"B{i}" for i in range(30)) + "\n")
    (folder / "features.tsv").write_text("\n".join(f"E{i}\tG{i}\tGene Expression" for i in range(50)) + "\n")
    with pytest.raises(He2stInputError, match="matrix.mtx.gz"):
        read_10x_mtx(folder)
    _truncated_gzip(folder / "barcodes.tsv.gz", "\n".join(f"B{i}" for i in range(3000)))
    (folder / "matrix.mtx.gz").write_bytes(gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n50 30 0\n"))
    with pytest.raises(He2stInputError, match="barcodes.tsv.gz"):
        read_10x_mtx(folder)


def test_h5_that_is_not_hdf5(tmp_path: Path) -> None:
    from he2st.io.visium import read_10x_h5

    path = tmp_path / "filtered_feature_bc_matrix.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(He2stInputError, match="filtered_feature_bc_matrix.h5"):
        read_10x_h5(path)


# -- weights and saved models ---------------------------------------------------------


@pytest.mark.parametrize("payload", [b"\x80\x02h\x05.", b"K", b"not a checkpoint"])
def test_weights_file_that_is_not_a_checkpoint(tmp_path: Path, payload: bytes) -> None:
    from he2st.encoders._weights import WeightsError, read_state_dict

    path = tmp_path / "w.pth"
    path.write_bytes(payload)  # b"\x80\x02h\x05." made the unpickler raise a raw KeyError
    with pytest.raises(WeightsError, match=r"w\.pth"):
        read_state_dict(path)


def test_pickle_payload_never_executes(tmp_path: Path) -> None:

    import torch

    from he2st.encoders._weights import WeightsError, read_state_dict

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - the classic pickle payload
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Evil()}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.fixture()
def saved_method(tmp_path: Path, tiny_cohort) -> Path:
    from he2st.methods import create_method

    genes = list(map(str, tiny_cohort[0].var_names))[:5]
    m = create_method("mean").fit([tiny_cohort[0]], genes)
    return m.save(tmp_path / "model")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: (p / "method.json").write_text("{not json"), "method.json.*not valid JSON"),
        (lambda p: (p / "method.json").write_text('{"method": "mean"}'), "method.json.*lacks keys"),
        (lambda p: (p / "method.json").write_text("[1, 2]"), "method.json.*lacks keys"),
        (lambda p: (p / "state.safetensors").unlink(), "state.safetensors.*does not exist"),
        (lambda p: (p / "state.safetensors").write_bytes(b"\xff" * 40), "state.safetensors.*not a readable"),
    ],
)
def test_load_method_on_a_broken_folder(saved_method: Path, damage, match: str) -> None:
    from he2st.methods import load_method

    damage(saved_method)
    with pytest.raises(He2stInputError, match=match):
        load_method(saved_method)


def test_load_method_unknown_method(saved_method: Path) -> None:
    from he2st.methods import load_method

    cfg = json.loads((saved_method / "method.json").read_text())
    cfg["method"] = "no_such_method"
    (saved_method / "method.json").write_text(json.dumps(cfg))
    with pytest.raises(He2stInputError, match="no_such_method"):
        load_method(saved_method)


# -- full disk --------------------------------------------------------------------------


def _enospc_after_partial_write(monkeypatch: pytest.MonkeyPatch, module) -> None:  # noqa: ANN001
    """Make ``module.np.save`` write a few bytes then fail as a full disk does."""

    def full_disk_save(file, arr, *args, **kwargs) -> None:  # noqa: ANN001, ARG001
        Path(file).write_bytes(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.np, "save", full_disk_save)


def test_feature_cache_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cohort) -> None:
    from he2st.encoders import cache as feature_cache

    folder = tmp_path / "cache" / "features"
    monkeypatch.setenv("HE2ST_CACHE", str(tmp_path / "cache"))
    _enospc_after_partial_write(monkeypatch, feature_cache)
    with pytest.raises(DiskFullError, match=r"features.*HE2ST_CACHE") as info:
        feature_cache.write_cache(folder / "x.npy", np.zeros((3, 4), np.float32), {}, tiny_cohort[0])
    assert isinstance(info.value, He2stInputError) and info.value.errno == errno.ENOSPC
    assert list(folder.iterdir()) == []  # no partial file


def test_patch_cache_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cohort) -> None:
    import he2st.image.patches as patches_mod
    from he2st.image import extract_patches

    monkeypatch.setenv("HE2ST_CACHE", str(tmp_path / "cache"))
    _enospc_after_partial_write(monkeypatch, patches_mod)
    with pytest.raises(DiskFullError, match="HE2ST_CACHE"):
        extract_patches(tiny_cohort[0], size_px=16, cache=True)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []
