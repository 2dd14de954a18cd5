"""The field's full metric set (issue 17) on the saved predictions of a her2st run.

Reads ``RUN/predictions/<method>/<slide>.h5ad`` (predicted values in ``.X``, observed in
``layers["observed"]``, both on the run's evaluation scale, spot grid in ``obs``) and scores
every slide with :func:`he2st.evaluate.evaluate_slide` and ``metrics=["all"]`` (PCC, MSE,
Spearman, nRMSE, AUC, JSD, and the opt-in SSIM, MI and Moran's-I SVG recovery). Nothing is
refitted: the numbers are those of the predictions the run wrote.

Prints, per method, mean ± sd over the held-out sections of each metric on all genes (ACG)
and the SVG recovery rate (``SVG_RECOVERY(SVG)``), and writes ``benchmarks/results/her2st_extended_metrics.json``.

    python benchmarks/her2st_extended_metrics.py RUN [RUN ...] [--methods ridge,stnet] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: Printed metrics (name in SlideEvaluation.as_dict, gene set).
COLUMNS = [("PCC", "ACG"), ("SPEARMAN", "ACG"), ("NRMSE", "ACG"), ("AUC", "ACG"), ("JSD", "ACG"),
           ("SSIM", "ACG"), ("MI", "ACG"), ("PCC", "HVG10"), ("PCC", "SVG")]


def score_run(run: Path, methods: list[str] | None) -> dict[str, dict[str, list[float]]]:
    """``{method: {"PCC(ACG)": [per slide], ..., "svg_recovery": [...]}}`` for one run folder."""
    import anndata as ad

    from he2st.evaluate.metrics import evaluate_slide

    out: dict[str, dict[str, list[float]]] = {}
    for folder in sorted((run / "predictions").iterdir()):
        if not folder.is_dir() or (methods and folder.name not in methods):
            continue
        rows: dict[str, list[float]] = {}
        for f in sorted(folder.glob("*.h5ad")):
            a = ad.read_h5ad(f)
            obs = np.asarray(a.layers["observed"], dtype=np.float64)
            keep = ~np.isnan(obs).any(axis=0)  # genes missing on the slide are not scored
            grid = np.stack([a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()], axis=1).astype(np.int64)
            ev = evaluate_slide(obs[:, keep], np.asarray(a.X, dtype=np.float64)[:, keep],
                                list(np.asarray(a.var_names)[keep]), metrics=["all"], grid=grid)
            for key, value in ev.as_dict().items():
                if isinstance(value, (int, float)) and not key.startswith("n_"):
                    rows.setdefault(key, []).append(float(value))
        if rows:
            out[folder.name] = rows
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders with predictions/")
    ap.add_argument("--methods", default=None, help="comma-separated method labels (default: all)")
    ap.add_argument("--out", default=str(HERE / "results" / "her2st_extended_metrics.json"))
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    t0 = time.perf_counter()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for run in map(Path, args.runs):
        for method, rows in score_run(run, methods).items():
            table[method] = {k: dict(zip(("mean", "sd"), _mean_sd(v))) for k, v in rows.items()}
            table[method]["run"] = {"folder": run.name, "slides": len(next(iter(rows.values())))}
    keys = [f"{m}({g})" for m, g in COLUMNS] + ["SVG_RECOVERY(SVG)"]
    header = "| method | " + " | ".join(keys) + " |"
    print(header)
    print("|" + "---|" * (len(keys) + 1))
    for method, row in table.items():
        cells = []
        for k in keys:
            cell = row.get(k)
            cells.append("n/a" if not cell or math.isnan(cell["mean"]) else f"{cell['mean']:.3f} ± {cell['sd']:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from he2st._utils import atomic_write_json

    atomic_write_json(args.out, {"runs": args.runs, "metrics": "all", "results": table,
                                 "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{time.perf_counter() - t0:.0f} s; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
