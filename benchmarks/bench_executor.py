"""Benchmark executors: serial (local) vs a process pool vs Ray, on her2st C2-C6 (or synthetic data).

The same leave-one-section-out run (``he2st benchmark``) under each executor, each in a
fresh run folder under a temporary directory, each executor in its own child process
(so that its peak memory is its own). Measured:

- wall time of the run and speed-up over serial (``local``); the wall time includes the
  executor's start-up (spawning the pool's workers; starting the local Ray instance and its
  workers, several seconds), which a long benchmark amortises;
- peak memory: the driver's ``ru_maxrss``, its children's (``RUSAGE_CHILDREN``: the pool's
  workers; Ray's workers are children of its raylet, not reaped before the end), and the
  peak of the summed RSS of the driver's whole process tree, sampled every 0.2 s with
  psutil while the run goes (driver + pool workers, or driver + raylet + Ray workers; the
  driver's ``ru_maxrss`` also covers loading the cohort before the run);
- whether ``metrics.csv`` is identical to serial's (byte for byte; and the largest
  absolute difference per method, since methods that train on a CPU with several torch
  threads need not be bit-identical);
- per-task costs: feature extraction per slide (a warm-up pass, one task per slide and
  encoder setting, timed in the parent), and per method the median seconds per fold of
  hyper-parameter selection, fit and predict (the fold records' ``timings``).

Feature cache: ``--cache warm`` (default) warms one cache before the runs and every
executor reads it (so the runs compare the fits; the warm-up gives the feature costs);
``--cache cold`` gives each executor an empty cache of its own (feature extraction is
then part of each run).

Writes ``benchmarks/results/bench_executor.json`` (``--json``) and prints a table.

    python benchmarks/bench_executor.py                      # her2st C2-C6, 5 methods, 3 executors
    python benchmarks/bench_executor.py --sections C2,C3 --methods mean,ridge   # a smoke test
    python benchmarks/bench_executor.py --data synthetic --executors local,processes
    python benchmarks/bench_executor.py --epochs 2 --workers 4 --cache cold

stnet and bleep run at the CPU budgets of ``her2st_loocv.py`` (``--epochs`` overrides both).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
METHODS = ["mean", "ridge", "knn", "stnet", "bleep"]
SYNTHETIC = {"n_slides": 4, "n_spots": 200, "n_genes": 40, "patch_px": 32, "seed": 0}


def _method_table(names: list[str], data: str, epochs: int | None, no_tta: bool = False) -> list[dict]:
    """Method entries of the run: her2st_loocv.py's labels and budgets (or color_stats on synthetic)."""
    if data == "synthetic":
        enc = {"encoder": "color_stats", "weights": None, "patch_px": 32}
        table = {"mean": ("mean", {}), "ridge": ("ridge", enc), "knn": ("knn", enc),
                 "stnet": ("stnet", {**enc, "epochs": 5}), "bleep": ("bleep", {**enc, "epochs": 5})}
    else:
        sys.path.insert(0, str(HERE))
        import her2st_loocv

        table = {}
        for rows in her2st_loocv.SETS.values():
            for label, name, params in rows:
                table.setdefault(label, (name, dict(params)))
    out = []
    for n in names:
        if n not in table:
            raise SystemExit(f"--methods: unknown method {n!r}; known: {sorted(table)}")
        name, params = table[n]
        params = dict(params)
        if epochs is not None and "epochs" in _defaults(name):
            params["epochs"] = int(epochs)
        if no_tta and params.get("tta", _defaults(name).get("tta")):
            params["tta"] = False
        out.append({"name": name, "label": n, "params": params})
    return out


def _defaults(name: str) -> dict:
    from he2st.methods import get_method_class

    cls = get_method_class(name)
    return {**cls.common_defaults, **cls.defaults}


def _config(args: argparse.Namespace, out: str, executor: str) -> dict:
    cfg = {
        "out": out,
        "data": args.data if args.data == "synthetic" else "her2st",
        "data_params": dict(SYNTHETIC) if args.data == "synthetic" else {"sections": args.sections},
        "methods": _method_table(args.methods, args.data, args.epochs, args.no_tta),
        "split": "loso",
        "seed": 0,
        "report": False,
        "quiet": True,
        "executor": executor,
    }
    if args.data == "synthetic":
        cfg["genes"] = "hvg:30"
    if executor != "local":
        cfg["workers"] = args.workers
    if executor == "ray":
        cfg["cpus_per_task"] = float(args.cpus_per_task)
    return cfg


def _cohort(args: argparse.Namespace):
    if args.data == "synthetic":
        from he2st.datasets import synthetic

        return synthetic(**SYNTHETIC), "hvg:30"
    from he2st.datasets import her2st, her2st_panel

    root = None if args.data == "her2st" else args.data
    return her2st(root=root, sections=args.sections), her2st_panel(root)


class _TreeSampler:
    """Peak of the summed RSS of this process and all its descendants (psutil, every ``period`` s)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.period)

    def __enter__(self) -> _TreeSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _one(args: argparse.Namespace) -> int:
    """Child process: one executor's run; writes its measurements to ``args.one_json``."""
    from he2st.benchmark import run_benchmark

    cohort, genes = _cohort(args)
    cfg = _config(args, args.one_out, args.one)
    cfg["genes"] = genes
    with _TreeSampler() as sampler:
        t0 = time.perf_counter()
        result = run_benchmark(cfg, cohort=cohort)
        wall = time.perf_counter() - t0
    kib = 1024  # ru_maxrss is in KiB on Linux
    out = {
        "executor": args.one,
        "wall_s": round(wall, 2),
        "folds_run": result.folds_run,
        "peak_rss_driver_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**20, 1),
        "peak_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20, 1),
        "peak_rss_tree_sum_mb": round(sampler.peak / 2**20, 1),
    }
    Path(args.one_json).write_text(json.dumps(out))
    return 0


def _warm_features(args: argparse.Namespace, cache: str) -> dict:
    """Run the feature tasks of the work graph serially into ``cache``; seconds per (slide, encoder)."""
    os.environ["HE2ST_CACHE"] = cache
    from he2st.benchmark.config import BenchmarkConfig
    from he2st.benchmark.executor import LocalExecutor, run_graph
    from he2st.benchmark.run import _work_graph
    from he2st.evaluate.splits import make_splits

    cohort, genes = _cohort(args)
    cfg = BenchmarkConfig.from_dict({**_config(args, "unused", "local"), "genes": genes})
    folds = make_splits(cfg.split, cohort, seed=cfg.seed)
    todo = [(s, f, None) for s in cfg.method_specs() for f in folds]
    tasks = [t for t in _work_graph(cfg, Path("unused"), todo, cohort, False) if t.kind == "feature"]
    ex = LocalExecutor()
    ex.start(cohort)
    t0 = time.perf_counter()
    res = run_graph(ex, tasks, quiet=True)
    per = {}
    for t in tasks:
        r = t.payload["request"]
        per[f"{r['slide']} {r['encoder']} {r['patch_px']}px tta={r['tta']}"] = round(res[t.key]["seconds"], 3)
    return {"tasks": len(tasks), "total_s": round(time.perf_counter() - t0, 2), "seconds_per_task": per}


def _task_costs(run: Path) -> dict:
    from he2st.evaluate.results import fold_records

    by: dict[str, dict[str, list[float]]] = {}
    for rec in fold_records(run):
        t = by.setdefault(rec["method"], {"select_s": [], "fit_s": [], "predict_s": []})
        for k in t:
            t[k].append(float(rec["timings"].get(k, 0.0)))
    return {m: {f"{k}_median": round(statistics.median(v), 3) for k, v in t.items()} | {"folds": len(t["fit_s"])}
            for m, t in by.items()}


def _compare(ref: Path, run: Path) -> dict:
    import pandas as pd

    same = (ref / "metrics.csv").read_bytes() == (run / "metrics.csv").read_bytes()
    a, b = pd.read_csv(ref / "metrics.csv"), pd.read_csv(run / "metrics.csv")
    keys = ["method", "fold", "test_slide", "metric", "gene_set"]
    m = a.merge(b, on=keys, suffixes=("_ref", ""), how="outer")
    diff = (m["value"] - m["value_ref"]).abs()
    per_method = {str(k): (None if v != v else float(v)) for k, v in diff.groupby(m["method"]).max().items()}
    return {"identical_metrics_csv": same, "max_abs_diff_per_method": per_method}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="her2st", help="her2st (default), a her2st folder, or synthetic")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="her2st sections (default C2-C6)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"labels of her2st_loocv.py (default {METHODS})")
    ap.add_argument("--epochs", type=int, default=None, help="override the epochs of every method that has them")
    ap.add_argument("--no-tta", action="store_true",
                    help="test-time augmentation off (stnet): its 8 dihedral passes make a cold cache 9x dearer")
    ap.add_argument("--executors", default="local,processes,ray", help="executors to compare; local is the reference")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="pool processes / Ray CPUs (default: all)")
    ap.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs of each Ray task")
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm",
                    help="warm: one feature cache warmed before all runs; cold: an empty cache per executor")
    ap.add_argument("--json", default=str(HERE / "results" / "bench_executor.json"))
    ap.add_argument("--keep", default=None, help="keep the run folders under this directory")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.one:
        return _one(args)
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if executors[0] != "local":
        executors = ["local", *[e for e in executors if e != "local"]]

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="he2st-bench-executor-"))
    tmp.mkdir(parents=True, exist_ok=True)
    warm_cache = str(tmp / "cache-warm")
    print(f"warming the feature cache ({args.cache} mode) ...", file=sys.stderr)
    features = _warm_features(args, warm_cache)
    rows = []
    try:
        for ex in executors:
            run = tmp / f"run-{ex}"
            shutil.rmtree(run, ignore_errors=True)
            cache = warm_cache if args.cache == "warm" else str(tmp / f"cache-{ex}")
            shutil.rmtree(tmp / f"cache-{ex}", ignore_errors=True)
            one_json = tmp / f"{ex}.json"
            env = {**os.environ, "HE2ST_CACHE": cache, "HE2ST_QUIET": "1"}
            argv_child = [sys.executable, __file__, "--one", ex, "--one-out", str(run), "--one-json", str(one_json),
                          "--data", args.data, "--sections", ",".join(args.sections), "--methods", ",".join(args.methods),
                          "--workers", str(args.workers), "--cpus-per-task", str(args.cpus_per_task)]
            if args.epochs is not None:
                argv_child += ["--epochs", str(args.epochs)]
            if args.no_tta:
                argv_child += ["--no-tta"]
            print(f"running {ex} ...", file=sys.stderr)
            subprocess.run(argv_child, env=env, check=True)
            row = json.loads(one_json.read_text())
            row["task_costs"] = _task_costs(run)
            rows.append(row)
        ref = tmp / "run-local"
        for row in rows:
            row["speedup_vs_local"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
            row.update(_compare(ref, tmp / f"run-{row['executor']}"))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = {
        "benchmark": "bench_executor",
        "data": args.data,
        "sections": args.sections if args.data != "synthetic" else None,
        "methods": args.methods,
        "epochs_override": args.epochs,
        "tta": not args.no_tta,
        "split": "leave-one-section-out",
        "cache": args.cache,
        "machine": {"cpus": os.cpu_count(), "workers": args.workers, "cpus_per_task": args.cpus_per_task},
        "feature_extraction": features,
        "executors": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    from he2st._utils import atomic_write_json

    atomic_write_json(args.json, summary)
    print(f"feature cache {args.cache}; feature extraction (warm-up, serial): {features['tasks']} tasks, "
          f"{features['total_s']} s")
    print(f"{'executor':<10} {'wall s':>8} {'speed-up':>9} {'driver MB':>10} {'children MB':>12} {'tree MB':>9} "
          f"{'identical':>10}")
    for r in rows:
        print(f"{r['executor']:<10} {r['wall_s']:>8.1f} {r['speedup_vs_local']:>9.2f} {r['peak_rss_driver_mb']:>10.0f} "
              f"{r['peak_rss_children_mb']:>12.0f} {r['peak_rss_tree_sum_mb']:>9.0f} {str(r['identical_metrics_csv']):>10}")
    print("per method (local run): median s per fold of select / fit / predict")
    for m, t in rows[0]["task_costs"].items():
        print(f"  {m:<10} {t['select_s_median']:>8} {t['fit_s_median']:>8} {t['predict_s_median']:>8}")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
