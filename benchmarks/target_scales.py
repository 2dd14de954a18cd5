"""What a method that trains on its paper's target scale can score on the common ``cpm_log1p`` scale.

her2st C2-C6, leave-one-section-out, the 785-gene Hist2ST panel. For each training scale
(ST-Net's ``stnet_norm``, Hist2ST/HisToGene/THItoGene's ``hist2st_lognorm``, plain ``log1p``)
and each held-out section, with constants fitted on the four training sections only:

- ``oracle``: the held-out section's TRUE values on the training scale, carried to
  ``cpm_log1p`` with :meth:`he2st.pp.normalize.Normalizer.convert` (what the protocol does with a
  method's predictions) and scored against the true ``cpm_log1p`` values: the ceiling of a
  perfect model of that scale (per-gene PCC over spots, averaged over genes; MSE);
- ``scales agree``: per-gene PCC between the true values on the two scales, before any map;
- ``mean predictor``: the training sections' per-gene mean ON THE TRAINING SCALE, converted,
  scored by MSE next to the ``cpm_log1p`` mean predictor's MSE. The scales' pseudo-counts differ
  (1 count for ST-Net, 1e4 / panel total for Hist2ST, 1e6 / library for ``cpm_log1p``), so the
  mean of one log scale is not the mean of the other (Jensen): a model that stays at its own
  mean scores a worse MSE on the common scale than the common mean predictor.

Writes ``benchmarks/results/target_scales.json`` and prints the table.

    python benchmarks/target_scales.py [--data PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
SCALES = ["stnet_norm", "hist2st_lognorm", "log1p"]


def main(argv: list[str] | None = None) -> int:
    from he2st._stats import pearson_per_gene
    from he2st._utils import atomic_write_json
    from he2st.datasets import her2st, her2st_panel
    from he2st.pp.normalize import Normalizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="her2st folder (default: he2st.datasets' lookup)")
    ap.add_argument("--out", default=str(HERE / "results" / "target_scales.json"))
    args = ap.parse_args(argv)

    cohort = her2st(root=args.data, sections=SECTIONS)
    panel = [g for g in her2st_panel(args.data) if all(g in s.var_names for s in cohort)]
    rows: dict[str, dict[str, list[float]]] = {}
    common_mean_mse = []
    for i, test in enumerate(cohort):
        train = [s for j, s in enumerate(cohort) if j != i]
        common = Normalizer("cpm_log1p").fit(train, panel)
        truth = common.transform(test, panel)
        common_train = np.concatenate([common.transform(s, panel) for s in train])
        common_mean_mse.append(float(((common_train.mean(axis=0) - truth) ** 2).mean()))
        for scale in SCALES:
            own = Normalizer(scale).fit(train, panel)
            own_truth = own.transform(test, panel)
            oracle = own.convert(own_truth, common)
            own_mean = np.concatenate([own.transform(s, panel) for s in train]).mean(axis=0, keepdims=True)
            mean_pred = own.convert(np.repeat(own_mean, test.n_obs, axis=0), common)
            r = rows.setdefault(scale, {"oracle_pcc": [], "oracle_mse": [], "scales_agree_pcc": [], "mean_predictor_mse": []})
            r["oracle_pcc"].append(float(np.nanmean(pearson_per_gene(truth, oracle)[0])))
            r["oracle_mse"].append(float(((oracle - truth) ** 2).mean()))
            r["scales_agree_pcc"].append(float(np.nanmean(pearson_per_gene(truth, own_truth)[0])))
            r["mean_predictor_mse"].append(float(((mean_pred - truth) ** 2).mean()))

    summary = {
        "benchmark": "target_scales",
        "sections": SECTIONS,
        "n_genes": len(panel),
        "common_scale": "cpm_log1p",
        "cpm_log1p_mean_predictor_mse": {"per_section": dict(zip(SECTIONS, common_mean_mse)),
                                         "mean": float(np.mean(common_mean_mse))},
        "scales": {
            scale: {key: {"per_section": dict(zip(SECTIONS, vals)), "mean": float(np.mean(vals))}
                    for key, vals in r.items()}
            for scale, r in rows.items()
        },
    }
    atomic_write_json(args.out, summary)
    print(f"{'training scale':<18}{'oracle PCC(ACG)':>17}{'oracle MSE':>12}{'scales agree':>14}{'own mean MSE':>14}")
    for scale, r in rows.items():
        print(f"{scale:<18}{np.mean(r['oracle_pcc']):>17.3f}{np.mean(r['oracle_mse']):>12.3f}"
              f"{np.mean(r['scales_agree_pcc']):>14.3f}{np.mean(r['mean_predictor_mse']):>14.3f}")
    print(f"cpm_log1p mean predictor MSE: {np.mean(common_mean_mse):.3f}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
