"""Peak memory and step time of slide-level models on a Visium-size slide.

HisToGene and Hist2ST attend over every spot of a slide; the published code
materialises the ``n x n`` attention matrix and runs out of memory on Visium
slides of thousands of spots (Jiang et al. 2024 cut slides into 4000 px
windows). This benchmark trains one epoch and predicts one slide of 5,000
spots with HisToGene at the paper's size (1024-d, 8 layers, 16 heads) under
each scaling option of :mod:`he2st.methods.families.slide`:

``full_explicit``  global attention with the matrix materialised (the published implementations)
``full``           global attention through ``scaled_dot_product_attention`` (no n x n matrix)
``windowed``       the benchmark paper's non-overlapping windows (training) and blended overlapping windows (prediction)
``knn``            local attention to the 64 nearest spots
``radius``         local attention to the spots within 4 pitches

Each run is its own subprocess, so its peak resident memory (``ru_maxrss``)
is its own; the parent also samples the child's RSS and stops it above
``--cap-gb`` (default 8 GB), which is then reported instead of a peak.

The slide is synthetic (:func:`he2st.datasets.synthetic`, hexagonal grid, 16 px
pitch, 16 px patches, 50 genes). The window side is 20 pitches (320 px): the
paper's 4000 px at 200 px per 100 um pitch (0.5 um/px), i.e. ~400 spots per
window, "hundreds of spots rather than thousands".

Usage::

    python benchmarks/bench_slide_memory.py            # all modes, writes benchmarks/results/bench_slide_memory.json
    python benchmarks/bench_slide_memory.py --modes knn windowed --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_slide_memory.json"
PITCH = 16
N_SPOTS = 5000
N_GENES = 50
WINDOW_PITCHES = 20

MODES = {
    "full_explicit": {"attention": "full_explicit", "window_px": None},
    "full": {"attention": "full", "window_px": None},
    "windowed": {"attention": "full", "window_px": float(WINDOW_PITCHES * PITCH), "window_min_spots": 0},
    "knn": {"attention": "knn", "attention_k": 64, "window_px": None},
    "radius": {"attention": "radius", "attention_radius": 4.0 * PITCH, "window_px": None},
}


def _slide(root: str | None):
    from he2st.datasets import synthetic

    return synthetic(n_slides=1, n_spots=N_SPOTS, n_genes=N_GENES, patch_px=PITCH, seed=0, root=root)[0]


def worker(mode: str, phase: str, threads: int, root: str | None) -> dict:
    """Run one phase ("train": one epoch; "predict": one slide) in this process and report."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("HE2ST_QUIET", "1")
    from he2st.pp.normalize import Normalizer
    from he2st.methods import create_method

    slide = _slide(root)
    genes = list(map(str, slide.var_names))
    params = dict(patch_px=PITCH, epochs=1, augment="none", **MODES[mode])
    m = create_method("histogene", **params)
    # Load the patches once before timing (they are cached on disk).
    from he2st.image import extract_patches

    extract_patches(slide, size_px=PITCH)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    if phase == "train":
        m.fit([slide], genes)
        n_steps = len(m._units(m.slide_data(slide, train=True)))
    else:
        m.genes = genes
        m.normalizer_ = Normalizer(m.params["normalization"]).fit([slide], genes)
        m.dims_ = {"n_genes": len(genes)}
        torch.manual_seed(0)
        m.model_ = m._build_model().eval()
        pred = m.predict(slide)
        assert pred.shape == (slide.n_obs, len(genes)) and np.isfinite(pred).all()
        n_steps = None
    seconds = time.perf_counter() - t0
    from he2st.methods.nn.transformer import count_parameters

    return {
        "mode": mode,
        "phase": phase,
        "seconds": round(seconds, 2),
        "steps": n_steps,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "rss_before_gb": round(base, 3),
        "n_spots": int(slide.n_obs),
        "parameters": count_parameters(m.model_) if m.model_ is not None else None,
    }


def run_child(mode: str, phase: str, threads: int, cap_gb: float, root: str | None) -> dict:
    """Run a worker subprocess, sampling its RSS; stop it above ``cap_gb``."""
    import psutil

    cmd = [sys.executable, __file__, "--worker", mode, phase, "--threads", str(threads)]
    if root:
        cmd += ["--root", root]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    max_seen = 0.0
    killed = False
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss / 1e9
        except psutil.NoSuchProcess:
            break
        max_seen = max(max_seen, rss)
        if rss > cap_gb:
            proc.kill()
            killed = True
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if killed:
        return {
            "mode": mode, "phase": phase, "exceeded_cap": True, "cap_gb": cap_gb,
            "rss_when_stopped_gb": round(max_seen, 3), "seconds_until_stopped": round(wall, 1),
        }
    if proc.returncode != 0:
        return {"mode": mode, "phase": phase, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    res = json.loads(out.strip().splitlines()[-1])
    res["exceeded_cap"] = False
    res["sampled_max_rss_gb"] = round(max_seen, 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--phases", nargs="*", default=["train", "predict"], choices=["train", "predict"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-gb", type=float, default=8.0)
    ap.add_argument("--root", default=None, help="synthetic data cache folder")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "PHASE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.threads, args.root)))
        return

    _slide(args.root)  # build the cached synthetic slide once, outside the measurements
    rows = []
    for mode in args.modes:
        for phase in args.phases:
            r = run_child(mode, phase, args.threads, args.cap_gb, args.root)
            rows.append(r)
            if r.get("exceeded_cap"):
                print(f"{mode:14s} {phase:8s} stopped: RSS {r['rss_when_stopped_gb']:.2f} GB > cap {args.cap_gb} GB "
                      f"after {r['seconds_until_stopped']} s", flush=True)
            elif "error" in r:
                print(f"{mode:14s} {phase:8s} error: {r['error']}", flush=True)
            else:
                steps = f" steps {r['steps']}" if r.get("steps") else ""
                print(f"{mode:14s} {phase:8s} peak RSS {r['peak_rss_gb']:.2f} GB  time {r['seconds']:.1f} s{steps}", flush=True)
    from he2st._utils import atomic_write_json

    result = {
        "benchmark": "bench_slide_memory",
        "description": "HisToGene (1024-d, 8 layers, 16 heads) on a synthetic 5,000-spot slide: "
        "one training epoch and one prediction per scaling mode, each in its own subprocess",
        "n_spots": N_SPOTS,
        "n_genes": N_GENES,
        "patch_px": PITCH,
        "window_px": WINDOW_PITCHES * PITCH,
        "threads": args.threads,
        "cap_gb": args.cap_gb,
        "modes": MODES,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "results": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
