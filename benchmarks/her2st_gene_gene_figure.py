"""Gene-gene correlation of observed vs predicted expression on a her2st run (mclSTExp Fig. 5, CMRCNet Fig. 4).

For one held-out section: the Pearson matrices of its top-50 highly expressed (HEG) and
top-50 highly variable (HVG) genes, observed next to each method, in the order of a
hierarchical clustering of the observed matrix (:func:`he2st.analysis.analyses.gene_gene_correlation`),
saved as one PNG. For every section: the correlation between the upper triangles of the
observed and predicted matrices, printed and written to JSON.

    python benchmarks/her2st_gene_gene_figure.py RUN --methods ridge,spahgc [--slide C4] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    import anndata as ad
    import numpy as np

    from he2st._utils import atomic_write_json
    from he2st.analysis.analyses import gene_gene_correlation
    from he2st.analysis.figures import correlation_heatmaps

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run folder with predictions/<method>/<slide>.h5ad")
    ap.add_argument("--methods", required=True, help="comma-separated method labels")
    ap.add_argument("--slide", default="C4", help="section drawn in the figure")
    ap.add_argument("--out-dir", default=str(HERE / "results" / "figures"))
    args = ap.parse_args(argv)
    run, methods = Path(args.run), [m.strip() for m in args.methods.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    table: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        for f in sorted((run / "predictions" / method).glob("*.h5ad")):
            pred = ad.read_h5ad(f)
            for kind in ("HEG", "HVG"):
                gg = gene_gene_correlation(None, pred, n_top=50, kind=kind)
                table.setdefault(method, {}).setdefault(kind, {})[f.stem] = round(float(gg.r), 4)
    for method, kinds in table.items():
        for kind, per_slide in kinds.items():
            v = np.asarray(list(per_slide.values()))
            print(f"{method:10s} {kind}: r(upper triangles) {v.mean():.3f} ± {v.std(ddof=1):.3f}  {per_slide}")

    import matplotlib

    matplotlib.use("Agg")
    for kind in ("HEG", "HVG"):
        panels = {}
        for method in methods:
            pred = ad.read_h5ad(run / "predictions" / method / f"{args.slide}.h5ad")
            gg = gene_gene_correlation(None, pred, n_top=50, kind=kind)
            panels.setdefault("observed", gg.observed)
            panels[f"{method} (r = {gg.r:.2f})"] = gg.predicted
        fig = correlation_heatmaps(panels, title=f"her2st {args.slide}, top-50 {kind}: gene-gene Pearson")
        path = out / f"her2st_gene_gene_{args.slide}_{kind}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        print(path)
    atomic_write_json(out / f"her2st_gene_gene_{run.name}.json", {"run": str(run), "r_upper_triangles": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
