"""Run a benchmark: every method on every fold, resumable, written atomically.

::

    from he2st.benchmark import run_benchmark
    result = run_benchmark({"data": "synthetic", "methods": ["mean", "ridge", "knn"],
                            "split": "loso", "encoder": "color_stats", "out": "runs/demo"})
    result.summary            # method x metric x gene set: mean, sd over test slides

or ``he2st benchmark --data synthetic --methods mean,ridge,knn --out runs/demo``,
or a TOML file (``he2st benchmark --config run.toml``) whose keys are the
fields of :class:`BenchmarkConfig`.

The fits run as tasks of an executor (``executor``: ``local``, the serial
default; ``processes``; ``ray``; see :mod:`he2st.benchmark.executor`): feature
extraction per (slide, encoder setting), then one task per (method, fold, seed).
Tasks return their results; this process alone writes the run folder, each
result as it arrives.

Run folder
----------
``config.json``
    The resolved configuration, package versions, seeds and git commit. It is
    written only once every option has been checked (methods and their
    parameters, genes, data, split), so a refused run leaves nothing behind.
``he2st.lock``
    Held (an OS lock, :mod:`he2st.benchmark.lock`) by the one process writing
    the folder; a second writer is refused, naming the holder. A lock left by a
    killed run is taken over. Temporary files of interrupted writes
    (``.<name>.<random>.tmp``) are never read as results and are removed when a
    run starts.
``folds/<method>/<fold>.json``
    Written atomically when a (method, fold) pair is done: its metrics,
    per-gene scores, panel, resolved method spec and timings. A rerun skips
    every pair that has one, so an interrupted run loses at most the pair in
    progress. Fold and slide ids that are not safe file names are sanitised and
    get a short hash of the id, so two ids never share a file. Methods may be added to a run folder later (only their pairs
    run); changing a method's settings, or a run-wide setting (data, split,
    genes, seed...), is refused.
``folds/<method>/seed<k>/<fold>.json``
    With ``seeds``: one record per (method, fold, seed), with a ``seed`` key;
    predictions and models go to ``seed<k>/`` folders likewise.
``predictions/<method>/<test_slide>.h5ad``
    ``.X`` predicted, ``layers["observed"]``, ``layers["uncertainty"]`` (when the
    method has one), ``obsm["spatial"]``, ``var`` = panel genes, normalised scale;
    laid out as :func:`he2st.predict` writes it (:mod:`he2st.inference.output`:
    ``uns["spatial"]`` with a 1000-pixel H&E thumbnail, so ``scanpy.pl.spatial``
    and ``squidpy.pl.spatial_scatter`` draw it as is).
``metrics.csv``
    Long table ``method, fold, test_slide, metric, gene_set, value, n_genes, n_nan``.
``per_gene.csv``
    ``method, fold, test_slide, gene, pcc, pvalue, mse, mean_observed, var_observed``, then
    one column per field metric computed (``spearman, nrmse, auc, jsd``; opt-in ``ssim, mi``,
    ``moran_observed, moran_predicted``; see :func:`he2st.evaluate.metrics.evaluate_slide`).
``summary.csv``
    Mean and sd over test slides per ``method, metric, gene_set`` (with seeds: of
    each slide's mean over seeds; ``summary_seeds.csv``: mean and sd over seeds).
``wilcoxon.csv``, ``top_genes.csv``
    Paired tests between methods (``WILCOXON_METRICS``: PCC(ACG), PCC(HEG), MSE(ACG) and the
    field metrics on ACG, SVG recovery) and the top genes per method; a method with no defined
    value (the mean baseline's PCC) is left out of both.
``models/<method>/<fold>/``
    Fitted models, when ``save_models`` is set.
``report.html``
    Self-contained report (:mod:`he2st.analysis.report`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st._utils import (
    atomic_path,
    atomic_write_json,
    clean_temp_files,
    jsonable,
)
from he2st.benchmark.config import (
    BenchmarkConfig,
    MethodSpec,
    RunConfigError,
    load_config,
)
from he2st.benchmark.lock import run_lock
from he2st.benchmark.provenance import check_or_write_config
from he2st.datasets import load as load_cohort
from he2st.errors import He2stInputError
from he2st.evaluate.metrics import WILCOXON_METRICS, summarize, top_genes, wilcoxon_table
from he2st.evaluate.results import (
    CONFIG_FILE,
    FOLDS_DIR,
    METRICS_COLUMNS,
    PER_GENE_COLUMNS,
    PREDICTIONS_DIR,
    RunResult,
    fold_records,
)
from he2st.evaluate.splits import Fold, make_splits

#: Version of the per-(method, fold) result records; older records are rerun.
_RESULT_VERSION = 1
#: Longer side of the H&E thumbnail in each prediction file's ``uns["spatial"]``.
PREDICTION_THUMBNAIL_MAX_SIDE = 1000


def run_benchmark(config: BenchmarkConfig | Mapping[str, Any] | str | os.PathLike, cohort: Any = None) -> RunResult:
    """Run (or resume) a benchmark and write its run folder; see the module docstring.

    Parameters
    ----------
    config
        A :class:`BenchmarkConfig`, a mapping of its fields, or a TOML file.
    cohort
        Optional cohort to use instead of loading ``config.data`` (e.g. one built
        in Python); ``config.data`` is then only recorded.

    Returns
    -------
    RunResult
        The tables, and how many (method, fold) pairs were run or skipped.

    Raises
    ------
    RunConfigError
        Bad configuration, or the run folder holds a run with a different configuration.
    """
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif not isinstance(config, BenchmarkConfig):
        config = BenchmarkConfig.from_dict(config)
    else:
        config.check()
    old_quiet = os.environ.get("HE2ST_QUIET")
    if config.quiet:
        os.environ["HE2ST_QUIET"] = "1"
    try:
        return _run(config, cohort)
    finally:
        if config.quiet:
            if old_quiet is None:
                os.environ.pop("HE2ST_QUIET", None)
            else:
                os.environ["HE2ST_QUIET"] = old_quiet


def _run(config: BenchmarkConfig, cohort: Any) -> RunResult:
    out = Path(config.out)
    # Everything is checked before the run folder is touched: a run refused here
    # leaves no config.json behind to block the corrected rerun.
    specs, cohort, folds = _validate(config, cohort)
    with run_lock(out):
        # Only one writer from here on: what an interrupted write left is stale.
        clean_temp_files(out)
        return _run_locked(config, out, specs, cohort, folds)


def _validate(config: BenchmarkConfig, cohort: Any) -> tuple[list[MethodSpec], Any, list[Fold]]:
    """Method specs, cohort and folds of a run, every option checked; nothing is written."""
    from he2st.evaluate.protocol import check_gene_spec
    from he2st.methods import create_method

    specs = config.method_specs()
    check_gene_spec(config.genes)
    for spec in specs:
        create_method(spec.name, **spec.params)  # the method's own checks of its parameters
    if cohort is None:
        cohort = load_cohort(config.data, config.data_params)
    folds = make_splits(config.split, cohort, seed=config.seed)
    return specs, cohort, folds


def _run_locked(config: BenchmarkConfig, out: Path, specs: list[MethodSpec], cohort: Any, folds: list[Fold]) -> RunResult:
    from he2st.benchmark.executor import make_executor, run_graph

    check_or_write_config(out, config, folds, cohort)
    tested = [s for f in folds for s in f.test]
    per_fold_files = len(set(tested)) < len(tested)

    seeds = config.seed_list()
    jobs = [(spec, fold, seed) for spec in specs for fold in folds for seed in seeds]
    done = {(spec.label, fold.name, seed): _finished(out, spec, fold, seed) for spec, fold, seed in jobs}
    todo = [j for j in jobs if not done[(j[0].label, j[1].name, j[2])]]
    n_skip = len(jobs) - len(todo)
    tasks = _work_graph(config, out, todo, cohort, per_fold_files) if todo else []
    if todo:
        _log(config, f"{len(todo)} (method, fold{', seed' if config.seeds else ''}) fits to run, {n_skip} resumed; "
             f"executor {config.executor}")
        executor = make_executor(config.executor, config.workers, config.ray_address, config.cpus_per_task,
                                 config.gpus_per_task)
        executor.start(cohort)
        try:
            run_graph(executor, tasks, quiet=config.quiet)
        finally:
            executor.close()
    n_run = len(todo)

    # The tables describe the whole folder: methods of earlier invocations too.
    recorded = json.loads((out / CONFIG_FILE).read_text()).get("methods", [])
    labels = list(dict.fromkeys([m["label"] for m in recorded] + [s.label for s in specs]))
    result = aggregate(out, labels=labels, folds=[f.name for f in folds], seeds=config.seeds)
    result.folds_run, result.folds_skipped = n_run, n_skip
    if config.report:
        from he2st.analysis.report import write_report

        result.report = write_report(out)
    return result


def _seed_spec(spec: MethodSpec, seed: int | None) -> MethodSpec:
    """The spec a (method, seed) fit uses: ``params["seed"]`` set to the seed (None: unchanged)."""
    if seed is None:
        return spec
    return MethodSpec(spec.name, spec.label, {**spec.params, "seed": int(seed)}, dict(spec.grid), dict(spec.search))


def _task_key(spec: MethodSpec, fold: Fold, seed: int | None) -> str:
    return f"fit {spec.label}/{fold.name}" + ("" if seed is None else f"/seed{seed}")


def _work_graph(config: BenchmarkConfig, out: Path, todo: list[tuple[MethodSpec, Fold, int | None]], cohort: Any,
                per_fold_files: bool) -> list[Any]:
    """Feature tasks (one per slide and encoder setting the fits read), then the fit tasks.

    See :mod:`he2st.benchmark.executor`; each fit's result is written by the driver as it arrives.
    """
    from he2st.benchmark.executor import Task, driver_env
    from he2st.evaluate.protocol import resolve_slides
    from he2st.methods import create_method

    env = driver_env()
    settings = {
        "genes": config.genes, "min_spots": config.min_spots, "markers": config.markers, "n_top": config.n_top,
        "clustering": config.clustering, "metrics": config.metrics, "save_models": config.save_models,
    }
    features: dict[str, Task] = {}
    fits: list[Task] = []
    for spec, fold, seed in todo:
        sspec = _seed_spec(spec, seed)
        deps = []
        try:
            planner = create_method(sspec.name, **sspec.params)
            train = resolve_slides(cohort, fold.train)
            ids = list(dict.fromkeys([*fold.train, *fold.val, *fold.test,
                                      *(s for f in fold.inner for s in (*f.train, *f.val, *f.test))]))
            requests = planner.feature_requests(train, resolve_slides(cohort, ids))
        except Exception:  # noqa: BLE001 (the fit task reports the real problem)
            requests = []
        for r in requests:
            key = "features " + json.dumps(r, sort_keys=True, default=str)
            if key not in features:
                features[key] = Task(key, "feature", {"request": r, "env": env})
            deps.append(key)
        payload = {
            "name": sspec.name, "label": sspec.label, "params": sspec.params, "grid": sspec.grid,
            "search": sspec.search, "fold": fold, "settings": settings, "env": env,
        }
        fits.append(Task(_task_key(spec, fold, seed), "fit", payload, deps=list(dict.fromkeys(deps)),
                         on_done=_writer(config, out, sspec, fold, seed, cohort, per_fold_files)))
    return [*features.values(), *fits]


def _writer(config: BenchmarkConfig, out: Path, spec: MethodSpec, fold: Fold, seed: int | None, cohort: Any,
            per_fold_files: bool) -> Any:
    """The driver's handler of one fit result: prediction files, model, then the fold record (atomically)."""

    def write(result: dict[str, Any]) -> None:
        from he2st._utils import atomic_dir

        files = _write_predictions(out, spec.label, fold, result, cohort, per_fold_files, seed)
        if result.get("model_files") is not None:
            with atomic_dir(_seed_dir(out / "models" / spec.label, seed) / _safe(fold.name)) as tmp:
                for rel, data in result["model_files"].items():
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(data)
        r = result["record"]
        head = {
            "version": _RESULT_VERSION,
            "method": spec.label,
            "method_name": spec.name,
            "spec": spec.record(),
            "fold": fold.to_dict(),
        }
        if seed is not None:
            head["seed"] = int(seed)
        atomic_write_json(
            _marker(out, spec.label, fold.name, seed),
            {
                **head,
                "params": r["params"],
                "pretrained": r["pretrained"],
                "panel": r["panel"],
                "selection": r["selection"],
                "missing_genes": r["missing_genes"],
                "predictions": files,
                "extra": r["extra"],
                "timings": r["timings"],
                "metrics": r["metrics"],
                "per_gene": r["per_gene"],
                "validation_metrics": r["validation_metrics"],
            },
        )

    return write


def _seed_dir(folder: Path, seed: int | None) -> Path:
    return folder if seed is None else folder / f"seed{int(seed)}"


def aggregate(out: str | os.PathLike, labels: Sequence[str] | None = None, folds: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None) -> RunResult:
    """Collect the per-(method, fold) results of a run folder into its CSV tables.

    Writes ``metrics.csv``, ``per_gene.csv``, ``summary.csv``, ``wilcoxon.csv``
    (paired tests between methods, with two methods or more) and ``top_genes.csv``;
    with folds whose validation slides were scored (``validation="score"``, the
    out-of-distribution protocol), also ``validation_metrics.csv`` and
    ``validation_summary.csv`` for those in-distribution slides.

    Parameters
    ----------
    out
        The run folder.
    labels
        Method labels to keep, in the row order wanted (default: every method
        with a result).
    folds
        Fold names to keep, in the row order wanted (default: every fold).
    seeds
        Seeds to keep (runs with ``seeds``); None: every record. With seeded
        records, ``metrics.csv`` and ``per_gene.csv`` gain a ``seed`` column,
        ``summary.csv`` is over test slides of the per-slide means over seeds, and
        ``summary_seeds.csv`` gives, per method, metric and gene set, the mean and sd
        over seeds of the mean over test slides (:func:`seed_summary`).

    Returns
    -------
    RunResult
        The tables just written (``config``, ``folds`` and ``report`` left empty).

    Raises
    ------
    he2st.errors.He2stInputError
        When the folder holds no finished (method, fold) result.
    """
    out = Path(out)
    metrics, per_gene, validation = [], [], []
    for d in fold_records(out):
        if labels is not None and d["method"] not in labels:
            continue
        if folds is not None and d["fold"]["name"] not in folds:
            continue
        if seeds is not None and d.get("seed") not in seeds:
            continue
        mt, pg = pd.DataFrame(d["metrics"]), pd.DataFrame(d["per_gene"])
        vm = pd.DataFrame(d["validation_metrics"]) if d.get("validation_metrics") else None
        if "seed" in d:
            for df in (mt, pg, vm):
                if df is not None:
                    df.insert(min(2, len(df.columns)), "seed", int(d["seed"]))
        metrics.append(mt)
        per_gene.append(pg)
        if vm is not None:
            validation.append(vm)
    if not metrics:
        raise He2stInputError(f"run folder {out} has no finished (method, fold) results under {FOLDS_DIR}/")
    m = _ordered(pd.concat(metrics, ignore_index=True), METRICS_COLUMNS)
    g = _ordered(pd.concat(per_gene, ignore_index=True), PER_GENE_COLUMNS)
    # Order rows as the config lists methods and folds, not as the file system does.
    if labels is not None:
        m["method"] = pd.Categorical(m["method"], categories=list(labels), ordered=True)
        g["method"] = pd.Categorical(g["method"], categories=list(labels), ordered=True)
    if folds is not None:
        m["fold"] = pd.Categorical(m["fold"], categories=list(folds), ordered=True)
        g["fold"] = pd.Categorical(g["fold"], categories=list(folds), ordered=True)
    seeded = "seed" in m.columns
    order = ["method", "fold", "seed"] if seeded else ["method", "fold"]
    m = m.sort_values(order, kind="stable").reset_index(drop=True)
    g = g.sort_values(order, kind="stable").reset_index(drop=True)
    m[["method", "fold"]] = m[["method", "fold"]].astype(str)
    g[["method", "fold"]] = g[["method", "fold"]].astype(str)
    if seeded:
        # A slide's value is its mean over seeds; the sd is then over test slides, as without seeds.
        keys = [c for c in ("method", "fold", "test_slide", "metric", "gene_set") if c in m.columns]
        per_slide = m.groupby(keys, sort=False, observed=True, dropna=False).agg(
            value=("value", "mean"), n_nan=("n_nan", "max")).reset_index()
        summary = summarize(per_slide)
        _write_csv(out / "summary_seeds.csv", seed_summary(m))
    else:
        summary = summarize(m)
    methods = list(dict.fromkeys(m["method"]))
    wil = []
    for metric, gs in WILCOXON_METRICS:
        sel = (m["metric"] == metric) & (m["gene_set"] == gs)
        have = [x for x in methods if (sel & (m["method"] == x)).any()]
        if len(have) >= 2:
            t = wilcoxon_table(m, metric, gs, have)
            if t.empty:
                continue
            t.insert(0, "gene_set", gs)
            t.insert(0, "metric", metric)
            wil.append(t)
    wilcoxon = pd.concat(wil, ignore_index=True) if wil else pd.DataFrame()
    top = top_genes(g, n=20)
    for name, df in (("metrics", m), ("per_gene", g), ("summary", summary), ("wilcoxon", wilcoxon), ("top_genes", top)):
        _write_csv(out / f"{name}.csv", df)
    if validation:
        v = _ordered(pd.concat(validation, ignore_index=True), METRICS_COLUMNS)
        _write_csv(out / "validation_metrics.csv", v)
        _write_csv(out / "validation_summary.csv", summarize(v))
    return RunResult(out=out, metrics=m, per_gene=g, summary=summary, wilcoxon=wilcoxon, top_genes=top)


def seed_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Spread over seeds: per seed the mean over test slides, then their mean and sd over seeds.

    Parameters
    ----------
    metrics
        ``metrics.csv`` of a run with seeds (a ``seed`` column).

    Returns
    -------
    pandas.DataFrame
        ``method, metric, gene_set, mean, sd, n_seeds`` (``sd`` over seeds; NaN with one seed).
    """
    by = ["method", "metric", "gene_set"]
    per_seed = metrics.groupby([*by, "seed"], sort=False, observed=True)["value"].mean().reset_index()
    g = per_seed.groupby(by, sort=False, observed=True)["value"]
    out = g.agg(mean="mean", sd=lambda v: v.std(ddof=1) if v.notna().sum() > 1 else np.nan)
    out["n_seeds"] = g.count()
    return out.reset_index()


# -- helpers ---------------------------------------------------------------------------------


def _records(df: pd.DataFrame | None) -> dict[str, list[Any]] | None:
    return None if df is None or df.empty else df.to_dict(orient="list")


def _ordered(df: pd.DataFrame, first: Sequence[str]) -> pd.DataFrame:
    cols = [c for c in first if c in df.columns]
    return df[cols + [c for c in df.columns if c not in cols]]


def _log(config: BenchmarkConfig, msg: str) -> None:
    if not config.quiet and os.environ.get("HE2ST_QUIET", "") in ("", "0"):
        print(f"[he2st] {msg}", file=sys.stderr, flush=True)


def _safe(name: str) -> str:
    """A file-name-safe version of a fold or slide id, distinct for distinct ids.

    An id that is already safe is kept; otherwise the readable sanitised name gets
    a short hash of the original, so ``x/1`` and ``x_1`` never share a file.
    """
    name = str(name)
    s = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    if s == name and s not in ("", ".", "..") and not s.startswith("."):
        return s
    return f"{s.lstrip('.') or '_'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _marker(out: Path, label: str, fold: str, seed: int | None = None) -> Path:
    return _seed_dir(out / FOLDS_DIR / label, seed) / f"{_safe(fold)}.json"


def _finished(out: Path, spec: MethodSpec, fold: Fold, seed: int | None = None) -> bool:
    """Whether (method, fold, seed) has a result; raises if it was made with other method settings."""
    spec = _seed_spec(spec, seed)
    path = _marker(out, spec.label, fold.name, seed)
    if not path.is_file():
        return False
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False  # unreadable: run the pair again (the file is replaced atomically)
    if d.get("version") != _RESULT_VERSION or "metrics" not in d or "spec" not in d:
        return False
    recorded = d.get("fold", {}).get("name")
    if recorded != fold.name:
        raise RunConfigError(
            f"{path}: holds the result of fold {recorded!r}, not of fold {fold.name!r}; "
            f"delete it to rerun fold {fold.name!r}"
        )
    now = spec.record()
    if d["spec"] != now:
        old = d["spec"]
        diff = sorted(
            k
            for k in set(old.get("params", {})) | set(now["params"])
            if old.get("params", {}).get(k) != now["params"].get(k)
        ) or [k for k in now if old.get(k) != now[k]]
        raise RunConfigError(
            f"run folder {out}: method {spec.label!r} has results made with other settings (differs in {diff}); "
            f"give this configuration another label, or delete {out / FOLDS_DIR / spec.label} to rerun it"
        )
    changed = _changed_defaults(d.get("params"), spec)
    if changed:
        raise RunConfigError(
            f"run folder {out}: method {spec.label!r} has results made when its defaults were different "
            f"(now differs in {changed}); delete {out / FOLDS_DIR / spec.label} to rerun it with today's defaults, "
            "or give the old values explicitly"
        )
    return True


def _changed_defaults(recorded: Any, spec: MethodSpec) -> list[str]:
    """Parameters whose value in a stored result differs from what the method would use now.

    A result stores every parameter its model had (defaults included), so a default
    changed since (a faithful-port fix, say) is caught instead of silently resumed.
    Keys only one side has are skipped: a parameter added later defaults to the old behaviour.
    So are the keys of the spec's grid or search space: a result stores the value the
    inner CV chose there, not a default.
    """
    if not isinstance(recorded, dict):
        return []
    from he2st.methods import get_method_class

    cls = get_method_class(spec.name)
    now = jsonable({**cls.common_defaults, **cls.defaults, **spec.params})
    old = jsonable(recorded)
    searched = set(spec.grid) | set((spec.search or {}).get("space", {}))
    return sorted(k for k in (set(now) & set(old)) - searched if not _same_value(now[k], old[k]))


def _same_value(a: Any, b: Any) -> bool:
    # Floats written by another numpy/Python may differ in the last bit (np.logspace grids).
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return a == b


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _write_predictions(out: Path, label: str, fold: Fold, result: dict[str, Any], cohort: Any, per_fold: bool,
                       seed: int | None = None) -> list[str]:
    """Prediction files of one fit result (:func:`he2st.benchmark.executor.fit_task`); their relative paths."""
    from he2st.inference.output import prediction_adata, write_h5ad

    files = []
    genes = list(result["genes"])
    for p in result["predictions"]:
        slide = cohort[p["slide_id"]]
        # The layout of he2st.predict (scanpy/squidpy draw it as is), plus the observed values.
        a = prediction_adata(
            slide,
            p["predicted"],
            genes,
            sd=p["uncertainty"],
            sd_layer="uncertainty",
            thumbnail_max_side=PREDICTION_THUMBNAIL_MAX_SIDE,
            info={
                "method": label,
                "method_name": result["model_name"],
                "fold": fold.name,
                "normalization": result["normalization"],
                "scale": result["normalization"],
                "missing_genes": list(p["missing_genes"]),
            },
        )
        a.layers["observed"] = np.asarray(p["observed"], dtype=np.float32)
        rel = _seed_dir(Path(PREDICTIONS_DIR) / label, seed)
        rel = rel / _safe(fold.name) if per_fold else rel
        rel = rel / f"{_safe(p['slide_id'])}.h5ad"
        write_h5ad(a, out / rel)
        files.append(str(rel))
    return files
