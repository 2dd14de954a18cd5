"""Encoder throughput on CPU, naive vs he2st's path, and end-to-end feature extraction on her2st.

Part 1 (``throughput``): images/s at batch 32, 224 px (random init; weights do not
change speed) for ``densenet121``, ``resnet50``, ``vit_b16`` and ``efficientnet_lite0``:

``naive``      float32, contiguous (NCHW) memory, ``torch.no_grad()``: the published code's way
``channels_last_fp32``  float32, channels-last, ``torch.inference_mode()`` (CNNs only)
``optimised``  what ``get_features(precision="auto")`` runs: ``torch.inference_mode()``,
               channels-last for CNNs, bf16 autocast where "auto" picks it (CNNs on CPUs
               with native bf16); transformers stay float32 on CPU
``bf16``       transformers only: explicit ``precision="bf16"`` (not chosen by "auto")

Each mode warms up on one batch, then times ``--reps`` batches; the fastest batch is
reported (the least disturbed by other jobs on a shared machine).

Part 2 (``end_to_end``): all her2st C2-C6 spots with counts (910) through
``efficientnet_lite0`` with its ImageNet weights (the package's default encoder), from a
warm patch cache: ``extract_patches`` (a memory-mapped cache hit) -> uint8 batches ->
preprocess (one prefetch thread) -> encoder, i.e. ``get_features`` without the feature
cache. Two measures of the data path's cost (target: at most 20 %):

``data_path_overhead_paired_median``  median, over ``--reps`` interleaved pairs, of
                                (end-to-end pass time / "raw" pass time) - 1, where a raw
                                pass runs the encoder alone over as many images in the
                                same batches, fed ready-made tensors (8 distinct batches
                                cycled); ``..._best_vs_best`` compares the fastest of each
``data_path_overhead_in_pass``  within a pass, (total - forward time) / forward time,
                                where forward time is what the encoder itself took; this
                                one is robust to other jobs slowing the whole machine

A pass without prefetch (``num_workers=0``) and one plain ``get_features(cache=False)``
call are reported too. Skipped with a message when the her2st data are absent.

The machine is shared (2 cores, other engineers' jobs running): measurements are
interleaved and the best of ``--reps`` kept; the load average at start and end is
recorded with the results. ``--threads`` defaults to 1: with the load above the core
count, 2 OpenMP threads were measured ~6x *slower* than 1 (efficientnet_lite0 bf16,
8 vs 49-59 img/s): each parallel region waits at a barrier for a descheduled thread.

Usage::

    python benchmarks/bench_encoders.py                 # writes benchmarks/results/bench_encoders.json
    python benchmarks/bench_encoders.py --threads 2 --reps 5   # on a machine of your own
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_encoders.json"
ENCODERS = ["densenet121", "resnet50", "vit_b16", "efficientnet_lite0"]
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
BATCH = 32


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_batches(fn, x, reps: int) -> float:
    """Fastest seconds per batch after one warm-up batch (min: robust to other jobs' bursts)."""
    fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return min(times)


def throughput(name: str, reps: int) -> dict:
    import torch

    from he2st.encoders import create_encoder
    from he2st.encoders.features import resolve_precision

    naive = create_encoder(name).eval()
    size = naive.info.input_size
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))

    def run_naive(inp):
        with torch.no_grad():
            return naive(inp)

    res = {"encoder": name, "kind": naive.info.kind, "batch": BATCH, "input_px": size}
    res["naive_img_s"] = round(BATCH / _time_batches(run_naive, x, reps), 2)
    del naive

    opt = create_encoder(name).eval()
    cnn = opt.info.kind == "cnn"
    prec = resolve_precision("auto", name, torch.device("cpu"))
    xo = x
    if cnn:
        opt.to(memory_format=torch.channels_last)
        xo = x.contiguous(memory_format=torch.channels_last)

    def run(inp, bf16):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return opt(inp)

    if cnn:
        res["channels_last_fp32_img_s"] = round(BATCH / _time_batches(lambda i: run(i, False), xo, reps), 2)
    res["auto_precision"] = prec
    res["optimised_img_s"] = round(BATCH / _time_batches(lambda i: run(i, prec == "bf16"), xo, reps), 2)
    if not cnn:
        res["bf16_img_s"] = round(BATCH / _time_batches(lambda i: run(i, True), xo, reps), 2)
    res["speedup"] = round(res["optimised_img_s"] / res["naive_img_s"], 2)
    return res


def end_to_end(reps: int) -> dict:
    import numpy as np
    import torch

    from he2st.datasets import her2st
    from he2st.encoders import create_encoder, get_features, preprocess
    from he2st.encoders.features import resolve_precision, run_encoder
    from he2st.image import extract_patches

    try:
        slides = list(her2st(sections=SECTIONS))
    except Exception as exc:  # noqa: BLE001 - any failure to find the data means "skip"
        return {"skipped": f"her2st C2-C6 not available: {exc}"}
    n = sum(s.n_obs for s in slides)
    t = time.perf_counter()
    for s in slides:
        extract_patches(s, 224)  # fill the patch cache (cold or already warm)
    warm_fill_s = time.perf_counter() - t

    enc = create_encoder("efficientnet_lite0", weights="imagenet")
    prec = resolve_precision("auto", enc, torch.device("cpu"))
    bf16 = prec == "bf16"
    enc.to(memory_format=torch.channels_last)
    # Eight distinct ready-made batches, cycled: one reused tensor would sit in the CPU cache.
    sample = np.asarray(extract_patches(slides[0], 224).images[: 8 * BATCH])
    pool = [
        preprocess(sample[i : i + BATCH], enc.info).contiguous(memory_format=torch.channels_last)
        for i in range(0, len(sample), BATCH)
    ]
    x = pool[0]

    def raw(inp):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return enc(inp)

    def e2e_pass(workers: int) -> dict:
        """Warm patch cache -> features for every slide; with the encoder's own wait/forward split."""
        tot = {"wait_s": 0.0, "forward_s": 0.0}
        t0 = time.perf_counter()
        for s in slides:
            st: dict = {}
            images = extract_patches(s, 224).images  # cache hit: memory-mapped
            run_encoder(enc, images, batch_size=BATCH, precision=prec, num_workers=workers, stats=st)
            tot["wait_s"] += st["wait_s"]
            tot["forward_s"] += st["forward_s"]
        tot["total_s"] = time.perf_counter() - t0
        return tot

    def raw_pass() -> float:
        """The encoder alone over as many images, in the same batches, from a ready-made tensor."""
        raw(x)  # warm-up
        t0 = time.perf_counter()
        for b in range(n // BATCH):
            raw(pool[b % len(pool)])
        if n % BATCH:
            raw(x[: n % BATCH])
        return time.perf_counter() - t0

    # The machine is shared and its load swings within seconds: interleave the
    # two kinds of pass and keep the best of each (the least disturbed).
    raws, passes = [], []
    for _ in range(reps):
        raws.append(raw_pass())
        passes.append(e2e_pass(1))
    passes0 = [e2e_pass(0)]
    raw_best = n / min(raws)
    best = min(passes, key=lambda p: p["total_s"])
    # Headline: the median over the interleaved (raw, end-to-end) pairs of their time
    # ratio -- one lucky or unlucky pass (another job starting or stopping) cannot move it.
    paired = statistics.median(p["total_s"] / r for p, r in zip(passes, raws, strict=True))
    # get_features itself (obsm, settings, cache off) once, to show it adds nothing on top.
    t = time.perf_counter()
    for s in slides:
        get_features(s, enc, patch_px=224, cache=False, precision="auto", batch_size=BATCH)
    gf_s = time.perf_counter() - t
    r3 = lambda v: round(v, 3)  # noqa: E731
    return {
        "encoder": "efficientnet_lite0", "weights": "imagenet", "precision": prec, "n_spots": n,
        "sections": SECTIONS, "batch": BATCH, "patch_cache_fill_or_check_s": round(warm_fill_s, 2),
        "raw_passes_s": [round(v, 2) for v in raws],
        "raw_forward_img_s_best": round(raw_best, 2),
        "e2e_passes_s": [round(p["total_s"], 2) for p in passes],
        "e2e_img_s_best": round(n / best["total_s"], 2),
        "best_pass": {k: r3(v) for k, v in best.items()},
        "data_path_overhead_paired_median": r3(paired - 1),
        "data_path_overhead_best_vs_best": r3(raw_best / (n / best["total_s"]) - 1),
        "data_path_overhead_in_pass": r3(best["total_s"] / best["forward_s"] - 1),
        "no_prefetch_pass": {k: r3(v) for k, v in passes0[0].items()},
        "data_path_overhead_in_pass_no_prefetch": r3(passes0[0]["total_s"] / passes0[0]["forward_s"] - 1),
        "get_features_s": round(gf_s, 2), "get_features_img_s": round(n / gf_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from he2st._utils import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see the notes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--encoders", nargs="*", default=ENCODERS)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("HE2ST_QUIET", "1")
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for name in args.encoders:
        r = throughput(name, args.reps)
        rows.append(r)
        print(
            f"{name:20s} naive {r['naive_img_s']:7.2f} img/s   "
            + (f"channels_last fp32 {r['channels_last_fp32_img_s']:7.2f}   " if "channels_last_fp32_img_s" in r else "")
            + f"optimised ({r['auto_precision']}) {r['optimised_img_s']:7.2f} img/s   x{r['speedup']}"
            + (f"   (bf16 {r['bf16_img_s']:.2f})" if "bf16_img_s" in r else ""),
            flush=True,
        )
    e2e = {"skipped": "--skip-e2e"} if args.skip_e2e else end_to_end(args.reps)
    if "skipped" in e2e:
        print(f"end-to-end: skipped ({e2e['skipped']})")
    else:
        print(
            f"end-to-end {e2e['n_spots']} her2st spots, {e2e['encoder']} ({e2e['precision']}): best pass "
            f"{e2e['e2e_img_s_best']} img/s vs best raw pass {e2e['raw_forward_img_s_best']} img/s; "
            f"data path overhead (median of paired passes) {100 * e2e['data_path_overhead_paired_median']:+.1f}%; "
            f"within a pass the encoder waits for data "
            f"{100 * e2e['data_path_overhead_in_pass']:.1f}% of its forward time "
            f"(without prefetch {100 * e2e['data_path_overhead_in_pass_no_prefetch']:.1f}%); "
            f"get_features {e2e['get_features_img_s']} img/s"
        )
    out = {
        "benchmark": "bench_encoders",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": args.threads,
            "torch": torch.__version__, "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "note": "shared machine: other jobs ran concurrently; compare modes within this run only",
        },
        "reps": args.reps,
        "throughput": rows,
        "end_to_end": e2e,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
