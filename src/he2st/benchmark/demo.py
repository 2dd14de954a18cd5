"""``he2st demo``: the synthetic cohort drawn, then the full benchmark protocol on it.

:func:`run_demo` draws each synthetic slide's spots over its H&E image and
writes ``summary.json``; :func:`demo_config` is the benchmark the demo runs
(leave-one-slide-out, :data:`~he2st.benchmark.config.DEMO_METHODS`,
``color_stats`` features); :func:`demo_prediction` ends the demo as a user
would use a model: the best method, trained on the other slides, predicts the
last slide as if it had never been sequenced, and its maps are drawn.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_path, atomic_write_json, progress
from he2st.benchmark.config import DEMO_ENCODER, DEMO_METHODS, BenchmarkConfig
from he2st.data.slide import meta


def demo_config(out: str | os.PathLike = "he2st-demo", seed: int = 0, **overrides: Any) -> BenchmarkConfig:
    """The demo run: the synthetic cohort (4 slides x 300 spots x 50 genes), leave-one-slide-out,
    every method of :data:`DEMO_METHODS`, ``color_stats`` features, all 50 genes.

    HEG/HVG use the top 10 genes (not 50: with a 50-gene panel they would equal ACG).

    Parameters
    ----------
    out
        Run folder.
    seed
        Seed of the synthetic cohort, of the methods and of k-fold shuffling.
    **overrides
        Other :class:`~he2st.benchmark.config.BenchmarkConfig` fields, replacing
        the demo's values.

    Returns
    -------
    BenchmarkConfig
        The demo configuration, checked.
    """
    d: dict[str, Any] = {
        "out": str(out),
        "data": "synthetic",
        "data_params": {"seed": seed},
        "methods": list(DEMO_METHODS),
        "split": "loso",
        "genes": "all",
        "encoder": DEMO_ENCODER,
        "n_top": 10,
        "seed": seed,
        "name": "demo (synthetic cohort)",
    }
    d.update(overrides)
    return BenchmarkConfig.from_dict(d, where="demo")


def run_demo(out: str | os.PathLike, *, seed: int = 0) -> dict[str, Any]:
    """The ``he2st demo`` pipeline as a function; returns (and writes) the summary.

    Writes ``<out>/spots_<slide>.png`` (regions over the H&E image) per slide and
    ``<out>/summary.json``, each atomically.

    Parameters
    ----------
    out
        Output folder (created if needed).
    seed
        Seed of the synthetic cohort.

    Returns
    -------
    dict
        ``cohort``, ``seed``, ``n_slides``, ``n_spots``, ``patch_px``, ``slides``
        (per slide: id, patient, spots, genes, median UMI, label counts, image,
        patch array shape, mean tissue fraction, figure path), ``seconds`` and
        ``summary_file`` (the path of ``summary.json``, not written into it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from he2st.analysis.plots import plot_spots
    from he2st.datasets import synthetic
    from he2st.image import extract_patches

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cohort = synthetic(seed=seed)
    t_data = time.perf_counter() - t0
    patch_px = int(cohort[0].uns["he2st_synthetic"]["patch_px"])
    slides = []
    for slide in progress(cohort, "demo: patches and plots", total=len(cohort)):
        m = meta(slide)
        patches = extract_patches(slide, size_px=patch_px)
        fig, ax = plt.subplots(figsize=(6, 6))
        plot_spots(slide, ax=ax, color="label")
        figure = out / f"spots_{m.slide_id}.png"
        with atomic_path(figure) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        plt.close(fig)
        slides.append(
            {
                "slide_id": m.slide_id,
                "patient": m.patient,
                "n_spots": int(slide.n_obs),
                "n_genes": int(slide.n_vars),
                "median_umi": float(_median_total(slide)),
                "labels": {str(k): int(v) for k, v in slide.obs["label"].value_counts().items()},
                "image": m.image_path,
                "patches_shape": list(patches.images.shape),
                "mean_tissue_fraction": float(patches.tissue_fraction.mean()),
                "figure": str(figure),
            }
        )
    summary = {
        "cohort": cohort.name,
        "seed": seed,
        "n_slides": len(cohort),
        "n_spots": int(sum(s.n_obs for s in cohort)),
        "patch_px": patch_px,
        "slides": slides,
        "seconds": {"build_cohort": round(t_data, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    atomic_write_json(out / "summary.json", summary)
    summary["summary_file"] = str(out / "summary.json")
    return summary


def _median_total(slide: Any) -> float:
    return float(np.median(np.asarray(slide.X.sum(axis=1)).ravel()))


def format_demo(summary: dict[str, Any]) -> str:
    """Human-readable lines for a :func:`run_demo` summary."""
    lines = [
        f"synthetic cohort (seed {summary['seed']}): {summary['n_slides']} slides, {summary['n_spots']} spots, "
        f"patches {summary['patch_px']}x{summary['patch_px']} px"
    ]
    for s in summary["slides"]:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(s["labels"].items()))
        lines.append(
            f"  {s['slide_id']} ({s['patient']}): {s['n_spots']} spots, median {s['median_umi']:.0f} UMI, "
            f"tissue {s['mean_tissue_fraction']:.2f}; {labels} -> {s['figure']}"
        )
    lines.append(f"summary: {summary.get('summary_file', '')}  ({summary['seconds']['total']:.1f} s)")
    return "\n".join(lines)


def demo_prediction(
    out: str | os.PathLike, result: Any = None, *, seed: int = 0, n_maps: int = 3, cohort: Any = None
) -> dict[str, Any]:
    """Predict the last synthetic slide as if unsequenced, with the demo's best method; write it and its maps.

    The method with the highest mean PCC(ACG) in ``result`` (else the first of
    :data:`DEMO_METHODS`) is fitted on every other slide, with the demo's
    settings, and predicts an image-only copy of the last slide
    (:func:`he2st.predict`). Writes ``<out>/prediction/<slide>.h5ad`` and
    ``<out>/prediction/<slide>_<gene>.png`` for the ``n_maps`` genes the method
    predicted best in the benchmark, each atomically.

    Parameters
    ----------
    out
        The demo folder (the report's).
    result
        The demo's :class:`~he2st.evaluate.results.RunResult` (to choose the
        method and genes); None takes the first method and the first genes.
    seed
        Seed of the synthetic cohort and of the method.
    n_maps
        How many genes to draw.
    cohort
        The cohort to use instead of the demo's synthetic one (e.g. a smaller one in tests).

    Returns
    -------
    dict
        ``method``, ``slide``, ``train_slides``, ``h5ad`` (path), ``maps`` (paths) and ``seconds``.
    """
    from he2st.datasets import synthetic
    from he2st.evaluate.protocol import choose_panel
    from he2st.inference import image_only, plot_maps, predict
    from he2st.inference.output import write_h5ad
    from he2st.methods import create_method

    t0 = time.perf_counter()
    cfg = demo_config(out, seed=seed)
    specs = {s.label: s for s in cfg.method_specs()}
    label = _best_method(result, list(specs)) or next(iter(specs))
    spec = specs[label]
    if cohort is None:
        cohort = synthetic(seed=seed)
    train, test = list(cohort)[:-1], list(cohort)[-1]
    panel = choose_panel(train, cfg.genes, min_spots=cfg.min_spots, markers=cfg.markers)
    model = create_method(spec.name, **spec.params).fit(train, panel)
    pred = predict(model, image_only(test))
    sid = meta(test).slide_id
    folder = Path(out) / "prediction"
    h5ad = folder / f"{sid}.h5ad"
    write_h5ad(pred, h5ad)
    genes = _best_genes(result, label, list(model.genes), n_maps)
    maps = plot_maps(pred, genes, folder, prefix=f"{sid}_")
    return {
        "method": label,
        "slide": sid,
        "train_slides": [meta(s).slide_id for s in train],
        "h5ad": str(h5ad),
        "maps": [str(p) for p in maps],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _best_method(result: Any, labels: list[str]) -> str | None:
    summary = getattr(result, "summary", None)
    if summary is None or not len(summary):
        return None
    s = summary[(summary["metric"] == "pcc") & (summary["gene_set"] == "ACG") & summary["method"].isin(labels)]
    s = s[np.isfinite(s["mean"].astype(float))]
    return None if s.empty else str(s.sort_values("mean", ascending=False, kind="stable")["method"].iloc[0])


def _best_genes(result: Any, label: str, genes: list[str], n: int) -> list[str]:
    per_gene = getattr(result, "per_gene", None)
    if per_gene is not None and len(per_gene):
        g = per_gene[(per_gene["method"] == label) & per_gene["gene"].isin(genes)]
        if not g.empty:
            ranked = g.groupby("gene")["pcc"].mean().dropna().sort_values(ascending=False, kind="stable")
            if len(ranked):
                return [str(x) for x in ranked.index[:n]]
    return genes[:n]


def format_prediction(info: dict[str, Any]) -> str:
    """Human-readable lines for a :func:`demo_prediction` result."""
    lines = [
        f"prediction: {info['method']} trained on {', '.join(info['train_slides'])} predicts {info['slide']} "
        f"from its image alone -> {info['h5ad']}"
    ]
    lines += [f"  map: {p}" for p in info["maps"]]
    return "\n".join(lines)
