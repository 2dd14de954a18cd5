"""Feature scaling under domain shift: the ridge probe on her2st C2-C6 with each ``feature_scaling``.

Two settings, frozen ``efficientnet_lite0`` ImageNet features of 224 px patches
(the her2st_loocv encoder), the 785-gene Hist2ST panel intersected with the
training sections' genes, ``cpm_log1p`` targets:

(a) shift: train on C2-C5, test on C6 whose H&E image is stain shifted
    (:func:`he2st.image.perturb.stain_shift`, strengths ``--strengths``; 0 is
    the image rewritten unchanged, up to uint8 rounding). The perturbed copies
    are written to ``--tmp`` and encoded once (new feature-cache entries).
(b) LOSO: leave one section out over C2-C6 (in-domain; no perturbation).

For each setting and ``feature_scaling`` in standard, floor, robust, slide,
none, cv: PCC(ACG), PCC(HEG) (the test section's 50 most expressed genes) and
MSE(ACG). Prints a table and writes ``benchmarks/results/her2st_domain_shift.json``.

    HE2ST_CACHE=/tmp/loso-cache python benchmarks/her2st_domain_shift.py [--data PATH]
        [--strengths 1,2] [--no-loso] [--tmp DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
ENCODER = {"encoder": "efficientnet_lite0", "weights": "imagenet", "patch_px": 224}
KINDS = ["standard", "floor", "robust", "slide", "none", "cv"]


def _fold(train, test, genes_spec, kinds):
    """Fit ridge with each scaling on ``train``, score on each slide of ``test``; rows of metrics."""
    from he2st.evaluate.metrics import evaluate_slide
    from he2st.evaluate.protocol import choose_panel
    from he2st.methods import create_method

    panel = choose_panel(train, genes=genes_spec)
    genes = list(panel.genes)
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        m = create_method("ridge", **ENCODER, feature_scaling=kind).fit(train, genes)
        for name, slide in test:
            ev = evaluate_slide(m.targets(slide), m.predict(slide), genes).as_dict()
            rows.append({"kind": kind, "test": name, "chosen": m.feature_scaling_, "alpha": m.alpha_,
                         "PCC(ACG)": ev["PCC(ACG)"], "PCC(HEG)": ev["PCC(HEG)"], "MSE(ACG)": ev["MSE(ACG)"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"  {name:>14} {kind:>8} (chosen {m.feature_scaling_:>8}, alpha {m.alpha_:g}): "
                  f"PCC(ACG) {ev['PCC(ACG)']:.3f}  PCC(HEG) {ev['PCC(HEG)']:.3f}  MSE {ev['MSE(ACG)']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    ap.add_argument("--strengths", default="1,2", help="comma-separated stain-shift strengths for C6")
    ap.add_argument("--no-loso", action="store_true", help="skip the in-domain leave-one-section-out part")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--tmp", default=None, help="folder for the perturbed C6 images (default: a temporary folder)")
    ap.add_argument("--out", default=str(HERE / "results" / "her2st_domain_shift.json"))
    args = ap.parse_args(argv)

    from he2st.datasets import her2st, her2st_panel
    from he2st.image.perturb import perturbed_slide

    kinds = [k for k in args.kinds.split(",") if k]
    strengths = [float(s) for s in args.strengths.split(",") if s]
    cohort = her2st(args.data, sections=SECTIONS)
    panel = her2st_panel(args.data)
    slides = {s: cohort[s] for s in SECTIONS}
    t_start = time.perf_counter()
    result: dict = {"encoder": ENCODER, "kinds": kinds, "strengths": strengths,
                    "perturbation": "he2st.image.perturb.stain_shift", "shift": [], "loso": []}

    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="he2st-domain-shift-"))
    print("(a) train C2-C5, test C6 (plain and stain shifted)", flush=True)
    test = [("C6", slides["C6"])]
    for s in strengths:
        t0 = time.perf_counter()
        test.append((f"C6 shift {s:g}", perturbed_slide(slides["C6"], tmp / f"C6_shift_{s:g}.tif", s)))
        print(f"  wrote C6 shift {s:g} in {time.perf_counter() - t0:.0f} s", flush=True)
    result["shift"] = _fold([slides[k] for k in SECTIONS[:4]], test, panel, kinds)

    if not args.no_loso:
        print("(b) leave one section out, C2-C6", flush=True)
        for held in SECTIONS:
            train = [slides[k] for k in SECTIONS if k != held]
            result["loso"] += _fold(train, [(held, slides[held])], panel, kinds)
        summary = {}
        for kind in kinds:
            r = [x for x in result["loso"] if x["kind"] == kind]
            summary[kind] = {m: float(np.mean([x[m] for x in r])) for m in ("PCC(ACG)", "PCC(HEG)", "MSE(ACG)")}
        result["loso_mean"] = summary
        print("LOSO means:")
        for kind, v in summary.items():
            print(f"  {kind:>8}: PCC(ACG) {v['PCC(ACG)']:.3f}  PCC(HEG) {v['PCC(HEG)']:.3f}  MSE {v['MSE(ACG)']:.4f}")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from he2st._utils import atomic_write_json

    atomic_write_json(out, result)
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
