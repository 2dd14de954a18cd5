"""Patch extraction: throughput and peak memory, lazy reader vs a naive whole-image load.

Cases (each runs in its own subprocess, so its peak resident memory --
``ru_maxrss`` -- is its own; ``rss_base`` is the RSS after imports and slide
building, before the timed part):

``her2st_lazy_cold``   :func:`he2st.image.extract_patches` on all C2-C6 spots with counts
                       (910) at 224 px, empty patch cache (decode, crop, tissue, write cache)
``her2st_lazy_warm``   the same in a new process with the cache filled (memory-mapped hit)
``her2st_naive``       PIL loads the whole JPEG, converts it to an array, then crops each
                       spot (white padding at edges), the way the published code does it
``tiff40k_lazy``       a generated 40000 x 40000 RGB tiled (256 px, JPEG q=90) pyramidal
                       TIFF, 1000 spots at 224 px, cache off: only the tiles under the spots
                       (plus the 1/64 level for the tissue thumbnail) are decoded
``tiff40k_lazy_cold``  the same with the patch cache on (adds the sha256 of the file)
``tiff40k_lazy_warm``  the same again in a new process: a cache hit
``jpeg20k_per_patch``  a generated 20000 x 20000 baseline JPEG (1.2 GB decoded, larger than
                       the 512 MB image cache), 20 spots, patch cache off, with the path he2st
                       had before issue 13: the whole JPEG decoded again for every patch
``jpeg20k_disk_cold``  the same JPEG, 1000 spots, today's path: decoded once into a
                       memory-mapped raw array under the he2st cache, then sliced per patch
``jpeg20k_disk_warm``  the same in a new process: the decoded array is already on disk

``--only-jpeg20k`` runs the three JPEG cases and merges their rows into the existing
JSON (rows of other cases are kept).

The 40k TIFF is written tile by tile from a generator (never held in memory)
under a temporary folder and deleted afterwards. No naive case runs on it: a
whole-image load would need 4.8 GB. The naive and lazy her2st outputs are
compared byte for byte (``checksum``).

Usage::

    python benchmarks/bench_patches.py          # writes benchmarks/results/bench_patches.json
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
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

RESULTS = Path(__file__).resolve().parent / "results" / "bench_patches.json"
REPO = Path(__file__).resolve().parents[1]
HER2ST = Path(os.environ.get("HE2ST_SHARED_DATA", REPO.parent / "shared" / "data")) / "her2st"
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
SIZE = 224
BIG = 40000
TILE = 256
N_BIG_SPOTS = 1000
LEVEL_DS = (1, 4, 16, 64)


# ----------------------------------------------------------------------------- data


def her2st_slides() -> list:
    import numpy as np
    import pandas as pd

    from he2st.data.slide import make_slide

    slides = []
    for sec in SECTIONS:
        df = pd.read_csv(HER2ST / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")
        df.index = [f"{x}x{y}" for x, y in zip(df.x, df.y, strict=True)]
        with gzip.open(HER2ST / "ST-cnts" / f"{sec}.tsv.gz", "rt") as fh:
            counted = pd.Index([line.split("\t", 1)[0] for line in fh][1:])
        df = df.loc[df.index.intersection(counted)]
        img = glob.glob(str(HER2ST / "ST-imgs" / "C" / sec / "*.jpg"))[0]
        slides.append(
            make_slide(np.ones((len(df), 1)), list(df.index), ["g"], df[["pixel_x", "pixel_y"]].to_numpy(),
                       slide_id=sec, image_path=img, spot_diameter_px=145.3, mpp=0.69)
        )
    return slides


def _tile(ds: int, y0: int, x0: int, h: int, w: int):
    """Synthetic H&E-like pixels of level ``ds`` at level pixels (y0, x0): a tissue disc with 'nuclei'."""
    import numpy as np

    Y = ((y0 + np.arange(h)) * ds)[:, None].astype(np.float32)
    X = ((x0 + np.arange(w)) * ds)[None, :].astype(np.float32)
    r2 = (X - BIG / 2) ** 2 + (Y - BIG / 2) ** 2
    tissue = r2 < 14000.0**2
    nuclei = (np.sin(X / 23.0) * np.sin(Y / 29.0) + 0.3 * np.sin((X + Y) / 97.0)) > 0.75
    out = np.empty((h, w, 3), np.uint8)
    out[:] = (244, 242, 245)  # glass
    pink = np.array([226, 168, 204], np.uint8)
    purple = np.array([110, 70, 160], np.uint8)
    out[tissue] = pink
    out[tissue & nuclei] = purple
    return out


def write_big_tiff(path: Path) -> float:
    """Write the 40k pyramidal TIFF tile by tile; returns seconds."""
    import tifffile

    t0 = time.perf_counter()

    def tiles(ds: int):
        size = BIG // ds
        for ty in range(0, size, TILE):
            for tx in range(0, size, TILE):
                yield _tile(ds, ty, tx, TILE, TILE)

    opts = {"tile": (TILE, TILE), "compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb",
            "dtype": "uint8", "maxworkers": 1}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(1), shape=(BIG, BIG, 3), subifds=len(LEVEL_DS) - 1, **opts)
        for ds in LEVEL_DS[1:]:
            tw.write(tiles(ds), shape=(BIG // ds, BIG // ds, 3), subfiletype=1, **opts)
    return time.perf_counter() - t0


def big_slide(path: Path):
    import numpy as np

    from he2st.data.slide import make_slide

    pitch = 780.0
    g = np.arange(-20, 21) * pitch
    xx, yy = np.meshgrid(g, g)
    xy = np.c_[xx.ravel(), yy.ravel()] + BIG / 2
    d = np.hypot(xy[:, 0] - BIG / 2, xy[:, 1] - BIG / 2)
    xy = xy[np.argsort(d, kind="stable")[:N_BIG_SPOTS]]
    xy = xy[np.random.default_rng(0).permutation(len(xy))]  # obs order unrelated to the file layout
    return make_slide(np.ones((len(xy), 1)), [f"s{i}" for i in range(len(xy))], ["g"], xy, slide_id="big",
                      image_path=str(path), spot_diameter_px=200.0, mpp=0.25)


# ----------------------------------------------------------------------------- one case (child)


def naive_patches(slide):
    import numpy as np
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    full = np.asarray(Image.open(slide.uns["he2st"]["image_path"]).convert("RGB"))
    H, W = full.shape[:2]
    xy = np.floor(slide.obsm["spatial"]).astype(int)
    out = np.full((len(xy), SIZE, SIZE, 3), 255, np.uint8)
    h = SIZE // 2
    for i, (x, y) in enumerate(xy):
        x0, y0 = x - h, y - h
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + SIZE, W), min(y0 + SIZE, H)
        if sx1 > sx0 and sy1 > sy0:
            out[i, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = full[sy0:sy1, sx0:sx1]
    return out


def write_big_jpeg(path: Path) -> float:
    """Write the 20k JPEG (the 40k geometry at half scale, built in bands); returns seconds."""
    import imagecodecs
    import numpy as np

    t0 = time.perf_counter()
    side = BIG // 2
    arr = np.empty((side, side, 3), np.uint8)
    for y in range(0, side, 1000):
        arr[y : y + 1000] = _tile(2, y, 0, 1000, side)
    path.write_bytes(imagecodecs.jpeg8_encode(arr, level=90))
    return time.perf_counter() - t0


def per_patch_decode() -> None:
    """Restore the pre-issue-13 path: an image larger than the cache is decoded for every read."""
    from he2st.image.lazy.pil import PilBackend

    PilBackend.decoded = lambda self: self._decode()  # type: ignore[method-assign]


def run_case(case: str, tiff: str | None) -> dict:
    import numpy as np
    import psutil

    from he2st.image import PatchCache, extract_patches

    if case.startswith("her2st"):
        slides = her2st_slides()
    elif case.startswith("jpeg20k"):
        s = big_slide(Path(tiff))
        n = 20 if case == "jpeg20k_per_patch" else N_BIG_SPOTS
        s = s[:n].copy()
        s.obsm["spatial"] = s.obsm["spatial"] / 2
        s.uns["he2st"]["spot_diameter_px"] = 100.0
        slides = [s]
        if case == "jpeg20k_per_patch":
            per_patch_decode()
    else:
        slides = [big_slide(Path(tiff))]
    rss_base = psutil.Process().memory_info().rss
    digest = hashlib.sha256()
    n = 0
    hits = misses = 0
    t0 = time.perf_counter()
    for s in slides:
        if case == "her2st_naive":
            images = naive_patches(s)
        else:
            cache = False if case in ("tiff40k_lazy", "jpeg20k_per_patch", "jpeg20k_disk_cold", "jpeg20k_disk_warm") else PatchCache()
            p = extract_patches(s, size_px=SIZE, cache=cache)
            images = p.images
            if cache:
                hits, misses = hits + cache.hits, misses + cache.misses
        digest.update(np.ascontiguousarray(images).tobytes())
        n += len(images)
        del images
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "case": case,
        "n_patches": n,
        "seconds": round(seconds, 3),
        "patches_per_s": round(n / seconds, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "rss_base_mb": round(rss_base / 2**20, 1),
        "cache_hits": hits,
        "cache_misses": misses,
        "checksum": digest.hexdigest()[:16],
    }


# ----------------------------------------------------------------------------- driver


def child(case: str, cache_dir: str, tiff: str | None) -> dict:
    env = {**os.environ, "HE2ST_CACHE": cache_dir, "HE2ST_QUIET": "1"}
    cmd = [sys.executable, __file__, "--case", case] + (["--tiff", tiff] if tiff else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--tiff", help=argparse.SUPPRESS)
    ap.add_argument("--skip-big", action="store_true", help="only the her2st cases")
    ap.add_argument("--only-jpeg20k", action="store_true", help="only the 20k JPEG cases, merged into the JSON")
    ap.add_argument("--write-jpeg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_jpeg:
        write_big_jpeg(Path(args.write_jpeg))
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.tiff)))
        return
    if args.only_jpeg20k:
        jpeg20k_main()
        return

    results: list[dict] = []
    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="he2st-bench-patches-") as tmp:
        tmp = Path(tmp)
        her_cache = str(tmp / "cache_her2st")
        for case in ("her2st_lazy_cold", "her2st_lazy_warm", "her2st_naive"):
            results.append(child(case, her_cache, None))
            print(f"  {case}: done", file=sys.stderr)
        if not args.skip_big:
            tiff = tmp / "big.tif"
            info["tiff_write_s"] = round(write_big_tiff(tiff), 1)
            info["tiff_file_mb"] = round(tiff.stat().st_size / 2**20, 1)
            info["tiff_shape"] = [BIG, BIG, 3]
            info["tiff_levels_downsample"] = list(LEVEL_DS)
            print(f"  wrote {tiff.name}: {info['tiff_file_mb']} MB in {info['tiff_write_s']} s", file=sys.stderr)
            big_cache = str(tmp / "cache_big")
            for case in ("tiff40k_lazy", "tiff40k_lazy_cold", "tiff40k_lazy_warm"):
                results.append(child(case, big_cache, str(tiff)))
                print(f"  {case}: done", file=sys.stderr)
            tiff.unlink()
        shutil.rmtree(tmp / "cache_her2st", ignore_errors=True)

    by = {r["case"]: r for r in results}
    info["her2st_naive_equals_lazy"] = by["her2st_naive"]["checksum"] == by["her2st_lazy_cold"]["checksum"]
    out = {
        "benchmark": "bench_patches",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "patch_px": SIZE,
        "info": info,
        "results": results,
    }
    sys.path.insert(0, str(REPO / "src"))
    from he2st._utils import atomic_write_json

    atomic_write_json(RESULTS, out)
    print(f"{'case':<20} {'n':>5} {'seconds':>8} {'patches/s':>10} {'peak RSS MB':>12} {'base RSS MB':>12} {'hits':>5}")
    for r in results:
        print(f"{r['case']:<20} {r['n_patches']:>5} {r['seconds']:>8.2f} {r['patches_per_s']:>10.1f} "
              f"{r['peak_rss_mb']:>12.1f} {r['rss_base_mb']:>12.1f} {r['cache_hits']:>5}")
    for k, v in info.items():
        print(f"{k}: {v}")
    print(f"wrote {RESULTS}")


def jpeg20k_main() -> None:
    """The 20k JPEG cases; their rows replace same-named rows of the existing JSON."""
    with tempfile.TemporaryDirectory(prefix="he2st-bench-jpeg-") as tmp:
        tmp = Path(tmp)
        jpg = tmp / "big.jpg"
        # Written by a child: ru_maxrss survives fork+exec, so a parent that held the
        # 1.2 GB array would hand that peak to every case it starts.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-jpeg", str(jpg)], check=True)
        info = {"jpeg_write_s": round(time.perf_counter() - t0, 1), "jpeg_file_mb": round(jpg.stat().st_size / 2**20, 1),
                "jpeg_shape": [BIG // 2, BIG // 2, 3]}
        rows = []
        for case in ("jpeg20k_per_patch", "jpeg20k_disk_cold", "jpeg20k_disk_warm"):
            rows.append(child(case, str(tmp / "cache_jpeg"), str(jpg)))
            print(f"  {case}: {rows[-1]}", file=sys.stderr)
    by = {r["case"]: r for r in rows}
    info["jpeg20k_speedup_cold_vs_per_patch"] = round(by["jpeg20k_disk_cold"]["patches_per_s"] / by["jpeg20k_per_patch"]["patches_per_s"], 1)
    info["jpeg20k_speedup_warm_vs_per_patch"] = round(by["jpeg20k_disk_warm"]["patches_per_s"] / by["jpeg20k_per_patch"]["patches_per_s"], 1)
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"benchmark": "bench_patches", "results": [], "info": {}}
    out["results"] = [r for r in out["results"] if r["case"] not in by] + rows
    out["info"].update(info)
    out["jpeg20k_created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.path.insert(0, str(REPO / "src"))
    from he2st._utils import atomic_write_json

    atomic_write_json(RESULTS, out)
    for r in rows:
        print(r)
    print(info)


if __name__ == "__main__":
    main()
