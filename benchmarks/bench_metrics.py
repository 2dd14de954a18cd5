"""Time each evaluation metric on a realistic slide (synthetic, 2,000 spots x 785 genes).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py [--spots 2000] [--genes 785]``.
Prints one line per metric and writes ``benchmarks/results/bench_metrics.json``. The numbers
choose :data:`he2st.evaluate.metrics.DEFAULT_METRICS`: metrics under about a second
per slide are computed by default, the others on request.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _slide(n_spots: int, n_genes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed counts-like values on a hex-ish grid, and noisy predictions."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    rows, cols = np.divmod(np.arange(n_spots), side)
    grid = np.column_stack([rows, cols * 2 + rows % 2])
    field = np.sin(rows[:, None] / rng.uniform(3, 20, n_genes)) + np.cos(cols[:, None] / rng.uniform(3, 20, n_genes))
    obs = np.log1p(rng.poisson(np.exp(field) * rng.uniform(0.1, 5, n_genes))).astype(np.float32)
    pred = (0.5 * obs + rng.normal(0, 0.5, obs.shape)).astype(np.float32)
    return obs, pred, grid


def main() -> None:
    from he2st.evaluate import field_metrics as F
    from he2st.evaluate.metrics import evaluate_slide

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spots", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_metrics.json"))
    args = ap.parse_args()
    obs, pred, grid = _slide(args.spots, args.genes)
    genes = [f"g{i}" for i in range(args.genes)]
    timings: dict[str, float] = {}

    def clock(name: str, fn) -> None:
        fn()  # warm-up (imports)
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        print(f"{name:>22}: {timings[name]:8.3f} s", flush=True)

    clock("evaluate_slide(base)", lambda: evaluate_slide(obs, pred, genes, metrics=["pcc"]))
    for name, fn in F.PER_GENE_FUNCTIONS.items():
        clock(name, lambda fn=fn: fn(obs, pred))
    clock("ssim", lambda: F.ssim_per_gene(obs, pred, grid))
    clock("svg (Moran's I x2)", lambda: (F.moran_i(obs, grid, genes), F.moran_i(pred, grid, genes)))
    clock("evaluate_slide(default)", lambda: evaluate_slide(obs, pred, genes))
    clock("evaluate_slide(all)", lambda: evaluate_slide(obs, pred, genes, metrics=["ssim", "mi", "svg", "spearman", "nrmse", "auc", "jsd"], grid=grid))
    record = {"n_spots": args.spots, "n_genes": args.genes, "seconds": timings}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
