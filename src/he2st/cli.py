"""The ``he2st`` command line.

Commands import their heavy modules (scanpy, torch, matplotlib) inside the
function body, so ``he2st --help`` and ``import he2st`` stay fast.

    he2st info PATH          summary of a slide or cohort (``synthetic`` for the toy cohort)
    he2st demo --out DIR     the full benchmark protocol on the synthetic cohort, with a report
    he2st benchmark ...      every method on every fold of a cohort (resumable run folder)

``--quiet`` (before the command) hides progress bars by setting ``HE2ST_QUIET=1``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="he2st",
    help="Predict spatial transcriptomics from H&E histology, and benchmark the methods that do it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        from he2st import __version__

        typer.echo(f"he2st {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Hide progress bars (sets HE2ST_QUIET=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """he2st: H&E -> spatial transcriptomics toolkit."""
    if quiet:
        os.environ["HE2ST_QUIET"] = "1"


def _fail(exc: Exception) -> typer.Exit:
    """Print a user-facing error (no traceback) and return the exit to raise."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


@app.command()
def info(
    path: str = typer.Argument(
        ..., help="A slide or dataset (h5ad, Space Ranger outs, HEST-1k, her2st root), or 'synthetic'."
    ),
) -> None:
    """Print a summary of a slide or a cohort."""
    from he2st.errors import He2stInputError

    try:
        if path == "synthetic":
            from he2st.datasets import synthetic

            obj: Any = synthetic()
        else:
            from he2st.io import read_any

            obj = read_any(path)
        from he2st.io import summarize

        typer.echo(summarize(obj))
    except He2stInputError as exc:
        raise _fail(exc) from None


@app.command()
def demo(
    out: Path = typer.Option(Path("he2st-demo"), "--out", "-o", help="Folder for the figures and summary.json."),
    seed: int = typer.Option(0, help="Seed of the synthetic cohort."),
) -> None:
    """Run the full benchmark protocol on the synthetic cohort and write an HTML report.

    Leave-one-slide-out over 4 synthetic slides with every fast method
    (he2st.evaluate.runner.DEMO_METHODS) on color_stats features; also draws the
    spots over each slide. Finishes in well under 2 minutes on a laptop CPU.
    """
    from he2st.errors import He2stInputError
    from he2st.evaluate.runner import demo_config, format_result, run_benchmark

    try:
        summary = run_demo(out, seed=seed)
        typer.echo(format_demo(summary))
        result = run_benchmark(demo_config(out, seed=seed))
    except He2stInputError as exc:
        raise _fail(exc) from None
    typer.echo(format_result(result))


def run_demo(out: str | os.PathLike, *, seed: int = 0) -> dict[str, Any]:
    """The ``he2st demo`` pipeline as a function; returns (and writes) the summary.

    Writes ``<out>/spots_<slide>.png`` (regions over the H&E image) per slide and
    ``<out>/summary.json``, each atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from he2st._utils import atomic_path, atomic_write_json, progress
    from he2st.analysis.plots import plot_spots
    from he2st.data.slide import meta
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
    import numpy as np

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


@app.command()
def benchmark(
    data: str = typer.Option(None, help="'synthetic', 'her2st', or a dataset path (folder of h5ad, HEST, her2st root)."),
    methods: str = typer.Option(None, help="Comma-separated method names (default: mean,ridge,knn)."),
    split: str = typer.Option(None, help="loso (default), lopo, kfold:K, nested, or a .json/.toml split file."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (default he2st-run); a rerun resumes it."),
    encoder: str = typer.Option(None, help="Feature encoder for every method that has one (e.g. color_stats)."),
    weights: str = typer.Option(None, help="Encoder weights: 'imagenet' or a local file."),
    patch_px: int = typer.Option(None, help="Patch side in image pixels for every method (synthetic: its spot pitch)."),
    genes: str = typer.Option(None, help="Panel: hvg:N (default hvg:1000), all, or a gene-list file."),
    min_spots: int = typer.Option(None, help="HVG filter: min training spots detecting a gene."),
    markers: str = typer.Option(None, help="Comma-separated marker genes, scored as PCC(markers)."),
    n_top: int = typer.Option(None, help="Size of the HEG/HVG gene sets (default 50)."),
    config: Path = typer.Option(None, "--config", "-c", help="TOML run configuration; options given here override it."),
    seed: int = typer.Option(None, help="Seed of every method and of k-fold shuffling (default 0)."),
    save_models: bool = typer.Option(None, "--save-models/--no-save-models", help="Save each fitted model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Hide progress bars and logs."),
) -> None:
    """Run (or resume) a benchmark: every method on every fold, metrics, predictions and report."""
    from he2st.errors import He2stInputError
    from he2st.evaluate.runner import config_from_options, format_result, run_benchmark

    if quiet:
        os.environ["HE2ST_QUIET"] = "1"
    try:
        cfg = config_from_options(
            config, data=data, methods=methods, split=split, out=out, encoder=encoder, weights=weights, patch_px=patch_px,
            genes=genes, min_spots=min_spots, markers=markers, n_top=n_top, seed=seed,
            save_models=save_models, quiet=quiet or None,
        )
        result = run_benchmark(cfg)
    except He2stInputError as exc:
        raise _fail(exc) from None
    typer.echo(format_result(result))


def main() -> None:
    """Console-script entry point (``he2st``)."""
    app(prog_name="he2st")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
