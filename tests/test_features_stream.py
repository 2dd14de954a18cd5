"""Streaming feature extraction of large slides: chunked, resumable, equal to the one-pass path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import he2st.encoders.features as features
from he2st._utils import default_cache_dir
from he2st.data.slide import make_slide
from he2st.encoders import create_encoder, get_features, get_tokens
from he2st.encoders.cache import PartialCache
from he2st.errors import He2stInputError
from he2st.image import PatchReader, extract_patches, read_patches

N = 37  # 5 chunks of 8 spots: 4 full, 1 short


def _he_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A cheap H&E-like texture: blurred noise in pink and purple, white glass on one side."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h // 4 + 1, w // 4 + 1))
    noise = np.kron(noise, np.ones((4, 4)))[:h, :w]
    pink, purple = np.array([230, 150, 190]), np.array([110, 60, 150])
    img = pink * (1 - noise[..., None]) + purple * noise[..., None]
    img[:, : w // 6] = 245  # glass
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def he_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "he.png"
    Image.fromarray(_he_array(120, 160)).save(path)
    return path


def _slide(image: Path, n: int = N):
    rng = np.random.default_rng(1)
    xy = np.column_stack([rng.uniform(0, 160, n), rng.uniform(0, 120, n)])
    return make_slide(
        np.zeros((n, 0)), [f"s_{i}" for i in range(n)], [], xy, slide_id="big", image_path=str(image),
        spot_diameter_px=20, counts=False,
    )


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("resnet18", input_size=32)


class CountingEncoder:
    """Wraps ``features.run_encoder``: counts calls (chunks) and raises on call ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.rows = 0
        self.fail_at = fail_at
        self._run = features.run_encoder

    def __call__(self, enc, images, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.rows += len(images)
        return self._run(enc, images, **kw)


def _partials() -> list[Path]:
    return sorted((default_cache_dir() / "features").rglob("*.partial.*"))


KW = dict(patch_px=24, batch_size=4, precision="fp32", num_workers=0)


def test_patch_reader_reads_what_extract_patches_cuts(he_image):
    slide = _slide(he_image)
    whole = extract_patches(slide, size_px=24, cache=False).images
    idx = np.array([30, 2, 2, 17])
    assert np.array_equal(read_patches(slide, idx, size_px=24), whole[idx])
    with PatchReader(slide, 24) as reader:
        assert reader.n == N and reader.read_px == 24
        out = np.zeros((3, 24, 24, 3), np.uint8)
        assert reader.read([0, 1, 2], out=out) is out and np.array_equal(out, whole[:3])
        with pytest.raises(IndexError, match=r"\[0, 37\)"):
            reader.read([N])


def test_streaming_equals_one_pass_and_writes_the_same_cache_file(he_image, encoder, monkeypatch):
    ref = get_features(_slide(he_image), encoder, cache=False, **KW)
    counter = CountingEncoder()
    monkeypatch.setattr(features, "run_encoder", counter)
    slide = _slide(he_image)
    X = get_features(slide, encoder, stream=True, chunk_spots=10, **KW)  # 10 -> 8: whole batches
    assert counter.calls == 5 and counter.rows == N
    np.testing.assert_allclose(X, ref, rtol=1e-5, atol=1e-6)
    assert not _partials()
    (npy,) = sorted((default_cache_dir() / "features").rglob("*.npy"))
    streamed = npy.read_bytes()
    side = json.loads(npy.with_suffix(".json").read_text())
    assert side["shape"] == [N, 512] and side["slide_id"] == "big"
    # The one-pass path (no cache hit: a fresh cache) writes the same file, byte for byte.
    npy.unlink()
    npy.with_suffix(".json").unlink()
    monkeypatch.setenv("HE2ST_STREAM_MIN_SPOTS", str(10 * N))
    Y = get_features(_slide(he_image), encoder, **KW)
    assert counter.calls == 6  # one pass: one call
    assert npy.read_bytes() == streamed and np.array_equal(X, Y)
    # Either file serves a later streamed call: same key.
    assert np.array_equal(get_features(_slide(he_image), encoder, stream=True, **KW), X)
    assert counter.calls == 6


def test_threshold_from_the_environment_turns_streaming_on(he_image, encoder, monkeypatch):
    counter = CountingEncoder()
    monkeypatch.setattr(features, "run_encoder", counter)
    monkeypatch.setenv("HE2ST_STREAM_MIN_SPOTS", "20")
    monkeypatch.setenv("HE2ST_STREAM_CHUNK", "16")
    get_features(_slide(he_image), encoder, cache=False, **KW)
    assert counter.calls == 3  # 37 > 20 spots: chunks of 16
    monkeypatch.setenv("HE2ST_STREAM_MIN_SPOTS", "37")
    get_features(_slide(he_image), encoder, cache=False, **KW)
    assert counter.calls == 4  # not above the threshold: one pass
    monkeypatch.setenv("HE2ST_STREAM_MIN_SPOTS", "many")
    with pytest.raises(He2stInputError, match="HE2ST_STREAM_MIN_SPOTS must be a positive integer"):
        get_features(_slide(he_image), encoder, cache=False, **KW)
    with pytest.raises(He2stInputError, match="chunk_spots"):
        get_features(_slide(he_image), encoder, cache=False, stream=True, chunk_spots=0, **KW)


def test_a_killed_run_resumes_from_its_last_finished_chunk(he_image, encoder, monkeypatch):
    clean = get_features(_slide(he_image), encoder, stream=True, chunk_spots=8, cache=False, **KW)
    crash = CountingEncoder(fail_at=3)  # chunks 1 and 2 finish, the third is killed
    monkeypatch.setattr(features, "run_encoder", crash)
    with pytest.raises(KeyboardInterrupt):
        get_features(_slide(he_image), encoder, stream=True, chunk_spots=8, **KW)
    progress, npy = _partials()
    assert npy.name.endswith(".partial.npy") and progress.name.endswith(".partial.json")
    assert json.loads(progress.read_text())["done"] == 16
    assert not [p for p in npy.parent.iterdir() if not p.name.endswith((".partial.npy", ".partial.json", ".lock"))]

    again = CountingEncoder()
    monkeypatch.setattr(features, "run_encoder", again)
    X = get_features(_slide(he_image), encoder, stream=True, chunk_spots=8, **KW)
    assert again.calls == 3 and again.rows == N - 16  # only the remaining chunks
    assert np.array_equal(X, clean)
    assert not _partials()


def _crash_after_two_chunks(he_image, encoder, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.setattr(features, "run_encoder", CountingEncoder(fail_at=3))
    with pytest.raises(KeyboardInterrupt):
        get_features(_slide(he_image), encoder, stream=True, chunk_spots=8, **KW)
    npy = next(p for p in _partials() if p.name.endswith(".partial.npy"))
    return npy, npy.with_name(npy.name.replace(".partial.npy", ".partial.json"))


@pytest.mark.parametrize("damage", ["shape", "dtype", "sidecar_n", "sidecar_settings", "sidecar_garbage", "no_npy",
                                    "done_beyond"])
def test_a_damaged_partial_is_discarded_and_restarted(he_image, encoder, monkeypatch, damage):
    clean = get_features(_slide(he_image), encoder, stream=True, chunk_spots=8, cache=False, **KW)
    npy, progress = _crash_after_two_chunks(he_image, encoder, monkeypatch)
    info = json.loads(progress.read_text())
    if damage == "shape":
        np.save(npy, np.ones((N, 7), np.float32))
    elif damage == "dtype":
        np.save(npy, np.ones((N, 512), np.float16))
    elif damage == "sidecar_n":
        progress.write_text(json.dumps({**info, "n": N + 1}))
    elif damage == "sidecar_settings":
        progress.write_text(json.dumps({**info, "settings": {**info["settings"], "patch_px": 99}}))
    elif damage == "sidecar_garbage":
        progress.write_text("{not json")
    elif damage == "no_npy":
        npy.unlink()
    elif damage == "done_beyond":
        progress.write_text(json.dumps({**info, "done": N + 5}))
    again = CountingEncoder()
    monkeypatch.setattr(features, "run_encoder", again)
    X = get_features(_slide(he_image), encoder, stream=True, chunk_spots=8, **KW)
    assert again.calls == 5 and again.rows == N  # started again from the first spot
    assert np.array_equal(X, clean)
    assert not _partials()


def test_partial_cache_commits_and_finishes(tmp_path):
    path = tmp_path / "k.npy"
    settings = {"encoder": "x", "dim": 3}
    part = PartialCache(path, 4, settings)
    assert part.done == 0 and not part.resumed and part.array is None
    with pytest.raises(He2stInputError, match="nothing allocated"):
        part.commit(2)
    arr = part.allocate((4, 3), np.float32)
    arr[:2] = 1.0
    part.commit(2)
    again = PartialCache(path, 4, settings)
    assert again.resumed and again.done == 2 and np.array_equal(again.array[:2], np.ones((2, 3)))
    with pytest.raises(He2stInputError, match="2 of 4 rows done"):
        again.finish("s")
    again.array[2:] = 2.0
    again.commit(4)
    again.finish("s")
    assert np.array_equal(np.load(path), np.array([[1.0] * 3] * 2 + [[2.0] * 3] * 2, np.float32))
    assert json.loads(path.with_suffix(".json").read_text())["shape"] == [4, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]
    # Other settings: a fresh start, the old partial deleted.
    PartialCache(path, 4, settings).allocate((4, 3), np.float32)
    assert not PartialCache(path, 4, {**settings, "dim": 4}).resumed
    assert not (tmp_path / "k.partial.npy").exists()


def test_tokens_stream_too(he_image, encoder, monkeypatch):
    ref = get_tokens(_slide(he_image), encoder, cache=False, **KW)
    counter = CountingEncoder()
    monkeypatch.setattr(features, "run_encoder", counter)
    toks = get_tokens(_slide(he_image), encoder, stream=True, chunk_spots=16, **KW)
    assert counter.calls == 3 and toks.dtype == np.float16 and toks.shape == ref.shape
    assert np.array_equal(np.asarray(toks), ref)


def test_streaming_with_a_stain_normaliser_estimates_the_source_once(he_image, encoder, monkeypatch):
    from he2st.image.stain import StainNormalizer

    slide = _slide(he_image)
    norm = StainNormalizer("reinhard").fit(extract_patches(slide, size_px=24, cache=False).images)
    ref = get_features(_slide(he_image), encoder, stain=norm, cache=False, **KW)
    # Fewer spots than the stain sample: the sample is every spot, so the values are the one-pass ones.
    X = get_features(_slide(he_image), encoder, stain=norm, stream=True, chunk_spots=8, cache=False, **KW)
    np.testing.assert_allclose(X, ref, rtol=1e-4, atol=1e-5)
    # A slide larger than the sample records it in the settings (another cache key).
    monkeypatch.setattr(features, "STREAM_STAIN_SAMPLE", 10)
    s = _slide(he_image)
    get_features(s, encoder, stain=norm, stream=True, chunk_spots=8, **KW)
    assert s.uns[features.UNS_KEY]["X_resnet18"]["stain_source"] == "sample10"


def test_entry_lock_lets_one_writer_in_at_a_time(tmp_path):
    import threading
    import time

    from he2st.encoders.cache import entry_lock

    path = tmp_path / "k.npy"
    entered = threading.Event()

    def other() -> None:
        with entry_lock(path):
            entered.set()

    with entry_lock(path):
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.2)
        assert not entered.is_set()  # waits for the holder
    t.join(5)
    assert entered.is_set() and (tmp_path / "k.lock").is_file()
