"""The ``he2st`` command line.

Commands import their heavy modules (scanpy, torch, matplotlib) inside the
function body, so ``he2st --help`` and ``import he2st`` stay fast.

    he2st info PATH          summary of a slide or cohort (``synthetic`` for the toy cohort)
    he2st demo --out DIR     the full benchmark protocol on the synthetic cohort, with a report
    he2st benchmark ...      every method on every fold of a cohort (resumable run folder)
    he2st train ...          fit one method on every slide of a dataset; a model folder with its card
    he2st predict MODEL IN   predict an H&E image or .h5ad slide: AnnData (+ maps, CSV/Parquet)
    he2st analyze RUN_DIR    add the papers' analyses (gene-gene correlation, regions, DE, enrichment) to a run
    he2st methods [NAME]     registered methods: family, paper, defaults, capabilities
    he2st encoders           registered image encoders

``--quiet`` (before the command) hides progress bars by setting ``HE2ST_QUIET=1``.

Every failure prints one line, ``error: <file or option>: <problem>``, and exits
with status 2 (130 when interrupted); ``he2st --debug <command>`` shows the full
traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

#: Exit status of every failure (as click uses for bad options), and of an interrupt.
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class _OneLineErrors(TyperGroup):
    """Runs a command and turns any exception it raises into one ``error:`` line (unless ``--debug``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(EXIT_ERROR) from None


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` of the CLI: ``warning: <message>`` on one line of stderr."""
    text = " ".join(str(message).split())
    typer.echo(f"warning: {text}", err=True)


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for an exception: ``error: <file or option>: <problem>``.

    Parameters
    ----------
    exc
        What a command raised.

    Returns
    -------
    str
        The line; an unexpected exception (not bad input, not a file system
        error) also says how to see its traceback.
    """
    from he2st.errors import He2stInputError

    if isinstance(exc, He2stInputError):
        text = str(exc)  # its message names the file, slide or option already
    elif isinstance(exc, OSError):
        problem = exc.strerror or str(exc) or type(exc).__name__
        text = f"{exc.filename}: {problem}" if exc.filename is not None else problem
    else:
        text = f"{type(exc).__name__}: {exc} (unexpected; run with --debug for the traceback)"
    return "error: " + " ".join(text.split())  # one line, whatever the message holds


app = typer.Typer(
    name="he2st",
    help="Predict spatial transcriptomics from H&E histology, and benchmark the methods that do it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
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
    debug: bool = typer.Option(False, "--debug", help="On failure, show the full traceback instead of one line."),
) -> None:
    """he2st: H&E -> spatial transcriptomics toolkit."""
    if quiet:
        os.environ["HE2ST_QUIET"] = "1"
    if not debug:
        import warnings

        # A warning is one "warning:" line on stderr, as an error is one "error:" line (no source excerpt).
        warnings.showwarning = _warning_line


@app.command()
def info(
    path: str = typer.Argument(
        ..., help="A slide or dataset (h5ad, Space Ranger outs, HEST-1k, her2st root), or 'synthetic'."
    ),
) -> None:
    """Print a summary of a slide or a cohort."""
    if path == "synthetic":
        from he2st.datasets import synthetic

        obj: Any = synthetic()
    else:
        from he2st.datasets import read_any

        obj = read_any(path)
    from he2st.datasets import summarize

    typer.echo(summarize(obj))


@app.command()
def demo(
    out: Path = typer.Option(Path("he2st-demo"), "--out", "-o", help="Folder for the figures, summary.json, the run folder and report.html."),
    seed: int = typer.Option(0, help="Seed of the synthetic cohort."),
) -> None:
    """Run the full benchmark protocol on the synthetic cohort and write an HTML report.

    Leave-one-slide-out over 4 synthetic slides with every fast method
    (he2st.benchmark.DEMO_METHODS) on color_stats features; also draws the
    spots over each slide, and ends by predicting the last slide from its
    image alone with the best method (prediction/ and its maps). Finishes in
    well under 2 minutes on a laptop CPU.

    \f

    Parameters
    ----------
    out
        ``--out``/``-o``: folder (default ``he2st-demo``) for the spot figures,
        ``summary.json`` and the benchmark run folder (tables, predictions,
        ``report.html``); a rerun resumes it.
    seed
        ``--seed``: seed of the synthetic cohort and of the methods (default 0).
    """
    from he2st.benchmark.demo import (
        demo_config,
        demo_prediction,
        format_demo,
        format_prediction,
        run_demo,
    )
    from he2st.benchmark.run import run_benchmark

    summary = run_demo(out, seed=seed)
    typer.echo(format_demo(summary))
    result = run_benchmark(demo_config(out, seed=seed))
    typer.echo(result.format_table())
    typer.echo(format_prediction(demo_prediction(out, result, seed=seed)))


@app.command()
def benchmark(
    data: str = typer.Option(None, help="'synthetic', 'her2st', or a dataset path (folder of h5ad, HEST, her2st root)."),
    methods: str = typer.Option(None, help="Comma-separated method names (default: mean,ridge,knn)."),
    split: str = typer.Option(None, help="loso (default), lopo, kfold:K, nested, or a .json/.toml split file."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (default he2st-run); a rerun resumes it."),
    encoder: str = typer.Option(None, help="Feature encoder for every method that has one (e.g. color_stats)."),
    weights: str = typer.Option(None, help="Encoder weights: 'imagenet' or a local file."),
    patch_px: int = typer.Option(None, help="Patch side in image pixels for every method (synthetic: its spot pitch)."),
    genes: str = typer.Option(None, help="Panel: hvg:N (batch-aware HVG; default hvg:1000, her2st: its 785-gene panel), hvg_intersect:N, all, or a gene-list file."),
    min_spots: int = typer.Option(None, help="HVG filter: min training spots detecting a gene."),
    markers: str = typer.Option(None, help="Comma-separated marker genes, scored as PCC(markers)."),
    n_top: int = typer.Option(None, help="Size of the HEG/HVG gene sets (default 50)."),
    config: Path = typer.Option(None, "--config", "-c", help="TOML run configuration; options given here override it."),
    seed: int = typer.Option(None, help="Seed of every method and of k-fold shuffling (default 0)."),
    seeds: str = typer.Option(None, help="Comma-separated seeds: every (method, fold) once per seed (e.g. 0,1,2)."),
    executor: str = typer.Option(None, help="Where tasks run: local (default, serial), processes, or ray."),
    workers: int = typer.Option(None, help="Parallel processes (processes), or CPUs of a local Ray instance."),
    ray_address: str = typer.Option(None, "--ray-address", help="A running Ray cluster (e.g. auto, ray://host:10001)."),
    cpus_per_task: float = typer.Option(None, help="CPUs each Ray task asks for (default 1)."),
    gpus_per_task: float = typer.Option(None, help="GPUs each Ray task asks for (default 0; fractions allowed)."),
    save_models: bool = typer.Option(None, "--save-models/--no-save-models", help="Save each fitted model."),
    maps: str = typer.Option(None, help="Comma-separated genes: predicted and observed maps of each test slide (run/maps/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Hide progress bars and logs."),
) -> None:
    """Run (or resume) a benchmark: every method on every fold, metrics, predictions and report.
    \f

    Options left unset keep the value of the ``--config`` file, or else the
    default of :class:`he2st.benchmark.config.BenchmarkConfig`.

    Parameters
    ----------
    data
        ``--data``: ``synthetic`` (default), ``her2st``, or a dataset path
        (folder of h5ad files, HEST-1k, her2st root).
    methods
        ``--methods``: comma-separated method names (default ``mean,ridge,knn``).
    split
        ``--split``: ``loso`` (default), ``lopo``, ``kfold:K``, ``nested``, or a
        ``.json``/``.toml`` split file.
    out
        ``--out``/``-o``: run folder (default ``he2st-run``); a rerun resumes it.
    encoder
        ``--encoder``: feature encoder of every method that has one.
    weights
        ``--weights``: encoder weights, ``imagenet`` or a local file.
    patch_px
        ``--patch-px``: patch side in image pixels of every method that has one
        (default: each method's own; on the synthetic cohort, its spot pitch).
    genes
        ``--genes``: panel recipe, ``hvg:N`` (N genes ranked by scanpy's batch-aware
        HVG across the training slides; default ``hvg:1000``, and for ``--data her2st``
        the papers' 785-gene panel), ``hvg_intersect:N`` (the published per-slide
        intersection), ``all``, or a gene-list file.
    min_spots
        ``--min-spots``: HVG filter, minimum training spots detecting a gene.
    markers
        ``--markers``: comma-separated marker genes, scored as PCC(markers).
    n_top
        ``--n-top``: size of the HEG/HVG gene sets (default 50).
    config
        ``--config``/``-c``: TOML run configuration; options given on the
        command line override its keys.
    seed
        ``--seed``: seed of every method and of k-fold shuffling (default 0).
    seeds
        ``--seeds``: comma-separated seeds; each (method, fold) runs once per seed
        and the summary gives mean ± sd over seeds (``summary_seeds.csv``).
    executor
        ``--executor``: ``local`` (serial, default), ``processes`` or ``ray``
        (:mod:`he2st.benchmark.executor`); not part of the run's fingerprint.
    workers
        ``--workers``: processes of the pool, or CPUs of a local Ray instance.
    ray_address
        ``--ray-address``: connect to this Ray cluster instead of starting one.
    cpus_per_task
        ``--cpus-per-task``: CPUs each Ray task asks for.
    gpus_per_task
        ``--gpus-per-task``: GPUs each Ray task asks for.
    save_models
        ``--save-models/--no-save-models``: save each fitted model.
    maps
        ``--maps``: genes whose predicted and observed maps are drawn for every
        test slide into ``<out>/maps/`` (:func:`he2st.benchmark.maps.write_run_maps`).
    quiet
        ``--quiet``/``-q``: hide progress bars and logs.
    """
    from he2st.benchmark.config import config_from_options
    from he2st.benchmark.run import run_benchmark

    if quiet:
        os.environ["HE2ST_QUIET"] = "1"
    cfg = config_from_options(
        config, data=data, methods=methods, split=split, out=out, encoder=encoder, weights=weights, patch_px=patch_px,
        genes=genes, min_spots=min_spots, markers=markers, n_top=n_top, seed=seed, seeds=seeds,
        executor=executor, workers=workers, ray_address=ray_address, cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task, save_models=save_models, quiet=quiet or None,
    )
    result = run_benchmark(cfg)
    typer.echo(result.format_table())
    if maps:
        from he2st.benchmark.maps import write_run_maps

        written = write_run_maps(result.out, maps)
        typer.echo(f"maps: {len(written)} PNG files in {Path(result.out) / 'maps'}")


@app.command()
def analyze(
    run_dir: Path = typer.Argument(..., help="A benchmark run folder (he2st benchmark --out)."),
    gmt: Path = typer.Option(None, "--gmt", help="Gene sets (GMT file) for over-representation of the DE lists."),
    groupby: str = typer.Option("label", "--groupby", help="obs column of region labels (ARI/NMI, DE groups)."),
    group: str = typer.Option(None, "--group", help="Group tested in DE against the rest (default: the most frequent label)."),
    n_top: int = typer.Option(50, "--n-top", help="Genes per HEG/HVG set (gene-gene correlation) and per DE list."),
    clusters: str = typer.Option("kmeans,leiden", "--clusters", help="Clusterings of region detection: kmeans, leiden or both."),
    seed: int = typer.Option(0, help="Random state of the clusterings."),
) -> None:
    """Add the papers' analyses to an existing run and re-render its report.

    Gene-gene correlation (HEG/HVG heatmaps, upper-triangle r), spatial region
    detection (k-means, Leiden; ARI/NMI), differential expression between labelled
    regions from predicted and observed expression, and enrichment of both lists
    in a GMT file. Tables go to RUN_DIR/analyses/, the report to RUN_DIR/report.html.

    Parameters
    ----------
    run_dir
        The run folder.
    gmt, groupby, group, n_top, seed
        As in :func:`he2st.analysis.analyses.analyze_run`.
    clusters
        ``--clusters``: comma-separated clusterings (``kmeans``, ``leiden``).
    """
    from he2st.analysis.analyses import analyze_run
    from he2st.analysis.report import write_report
    from he2st.benchmark.lock import run_lock

    from he2st.errors import He2stInputError

    if not (Path(run_dir) / "metrics.csv").is_file():
        raise He2stInputError(f"{str(run_dir)!r}: not a finished run folder (no metrics.csv); run he2st benchmark first")
    algos = [c.strip() for c in clusters.split(",") if c.strip()]
    with run_lock(run_dir):
        written = analyze_run(run_dir, gmt=gmt, groupby=groupby, group=group, n_top=n_top, clusters=algos, seed=seed)
        report = write_report(run_dir)
    typer.echo(f"analyses: {', '.join(sorted(p.name for p in written.values()))} in {Path(run_dir) / 'analyses'}")
    typer.echo(f"report: {report}")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (method, state and card.json)."),
    method: str = typer.Option(None, help="Method to train (e.g. ridge, stnet); see 'he2st methods'."),
    data: str = typer.Option(None, help="'synthetic' (default), 'her2st', or a dataset path."),
    params: list[str] = typer.Option(None, "--params", help="Method parameters: key=value or a JSON object; repeatable."),
    genes: str = typer.Option(None, help="Panel: hvg:N (default hvg:1000), mean:N, all, or a gene-list file."),
    config: Path = typer.Option(None, "--config", "-c", help="TOML run configuration; options given here override it."),
    cv: bool = typer.Option(False, "--cv", help="Also run leave-one-slide-out on the training slides; metrics go into the card."),
    encoder: str = typer.Option(None, help="Feature encoder, if the method has one (e.g. color_stats)."),
    weights: str = typer.Option(None, help="Encoder weights: 'imagenet' or a local file."),
    patch_px: int = typer.Option(None, help="Patch side in image pixels (synthetic: its spot pitch)."),
    seed: int = typer.Option(None, help="Seed of the method (default 0)."),
) -> None:
    """Fit one method on every slide of a dataset and save it as a model folder with its card.
    \f

    Parameters
    ----------
    out
        ``--out``/``-o``: the model folder (``method.json``, ``state.safetensors``,
        ``card.json``); written complete or not at all.
    method
        ``--method``: registered method (or a label of the config file's methods).
    data
        ``--data``: ``synthetic`` (default), ``her2st`` or a dataset path.
    params
        ``--params``: method parameters, ``key=value`` or a JSON object; repeatable.
    genes
        ``--genes``: panel recipe chosen on the training slides.
    config
        ``--config``/``-c``: TOML run configuration.
    cv
        ``--cv``: leave-one-slide-out metrics on the training slides, stored in the card.
    encoder, weights, patch_px
        Run-wide feature settings, as ``he2st benchmark`` takes them.
    seed
        ``--seed``: seed of the method.
    """
    from he2st.benchmark.train import format_training, train_model

    result = train_model(
        out, data=data, method=method, params=list(params or []), genes=genes, config_file=config, cv=cv,
        encoder=encoder, weights=weights, patch_px=patch_px, seed=seed,
    )
    typer.echo(format_training(result))


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Model folder written by 'he2st train'."),
    input_path: Path = typer.Argument(..., metavar="IMAGE_OR_H5AD", help="An H&E image or an .h5ad slide. An image is predicted at --spots, on a --grid-um grid, or by default on a grid like the model's training spots."),
    out: Path = typer.Option(..., "--out", "-o", help="Prediction AnnData to write (.h5ad)."),
    spots: Path = typer.Option(None, help="Image input: spot table (CSV/TSV: id, x, y in image pixels; a legacy ST *_selection.tsv works too)."),
    grid_um: float = typer.Option(None, "--grid-um", help="Image input: predict on a generated grid with this spacing in micrometres."),
    mpp: float = typer.Option(None, help="Microns per pixel of the image, when its file does not say."),
    maps: str = typer.Option(None, help="Comma-separated genes: one PNG each, over the H&E thumbnail, next to --out."),
    csv: bool = typer.Option(False, "--csv", help="Also write the matrix as <out>.csv (spot_id, x, y, genes)."),
    parquet: bool = typer.Option(False, "--parquet", help="Also write the matrix as <out>.parquet."),
) -> None:
    """Predict the expression of an H&E image or an .h5ad slide with a trained model.
    \f

    Parameters
    ----------
    model
        The model folder (verified against its card: digests and version).
    input_path
        An H&E image (read as an image-only slide) or an ``.h5ad`` slide (its
        counts, if any, are ignored).
    out
        ``--out``/``-o``: the prediction ``.h5ad`` (scanpy/squidpy layout).
    spots
        ``--spots``: spot table of an image input.
    grid_um
        ``--grid-um``: spacing of a generated spot grid on an image input.
    mpp
        ``--mpp``: microns per pixel of the image.
    maps
        ``--maps``: genes to draw, ``<out stem>_<gene>.png`` next to ``--out``.
    csv, parquet
        ``--csv``/``--parquet``: also export the matrix as a table.
    """
    from he2st.errors import He2stInputError
    from he2st.inference.files import predict_file

    if csv and parquet:
        raise He2stInputError("--csv, --parquet: give one of them, not both")
    result = predict_file(
        model, input_path, out, spots=spots, grid_um=grid_um, mpp=mpp, maps=maps,
        table="csv" if csv else "parquet" if parquet else None,
    )
    pred = result["prediction"]
    typer.echo(f"predicted {pred.n_vars} genes at {pred.n_obs} spots ({pred.uns['he2st_prediction']['scale']}): {result['h5ad']}")
    if result["table"] is not None:
        typer.echo(f"table: {result['table']}")
    for p in result["maps"]:
        typer.echo(f"map: {p}")


@app.command()
def methods(
    name: str = typer.Argument(None, help="Show one method's defaults and capabilities."),
) -> None:
    """List the registered methods (built-in and from other packages), or show one."""
    from he2st.methods import list_methods, method_info

    if name is not None:
        typer.echo(_format_method(method_info(name)))
        return
    rows = [method_info(n) for n in list_methods()]
    typer.echo(f"{'name':<12} {'family':<12} {'paper':<34} summary")
    for r in rows:
        typer.echo(f"{r['name']:<12} {r['family']:<12} {r['paper'][:34]:<34} {r['summary']}")


def _format_method(info: dict[str, Any]) -> str:
    caps = ", ".join(k for k, v in info["capabilities"].items() if v) or "none"
    lines = [
        f"{info['name']} ({info['family']}): {info['summary']}",
        f"paper: {info['paper'] or 'he2st'}",
        f"class: {info['class']}",
        f"capabilities: {caps}",
        "defaults:",
    ]
    lines += [f"  {k} = {v!r}" for k, v in info["defaults"].items()]
    return "\n".join(lines)


@app.command()
def encoders() -> None:
    """List the registered image encoders: kind, feature size, named weights."""
    from he2st.encoders import get_spec, list_encoders

    typer.echo(f"{'name':<20} {'kind':<6} {'dim':>5}  {'weights':<10} description")
    for n in list_encoders():
        spec = get_spec(n)
        named = ",".join(spec.named_weights) or "file"
        typer.echo(f"{n:<20} {spec.kind:<6} {spec.dim:>5}  {named:<10} {spec.description}")


def main() -> None:
    """Console-script entry point (``he2st``)."""
    app(prog_name="he2st")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
