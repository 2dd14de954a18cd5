"""The benchmark runner: every method on every fold, resumable, written atomically.

::

    from he2st.evaluate import run_benchmark
    result = run_benchmark({"data": "synthetic", "methods": ["mean", "ridge", "knn"],
                            "split": "loso", "encoder": "color_stats", "out": "runs/demo"})
    result.summary            # method x metric x gene set: mean, sd over test slides

or ``he2st benchmark --data synthetic --methods mean,ridge,knn --out runs/demo``,
or a TOML file (``he2st benchmark --config run.toml``) whose keys are the
fields of :class:`BenchmarkConfig`.

Run folder
----------
``config.json``
    The resolved configuration, package versions, seeds and git commit.
``folds/<method>/<fold>.json``
    Written atomically when a (method, fold) pair is done: its metrics,
    per-gene scores, panel, resolved method spec and timings. A rerun skips
    every pair that has one, so an interrupted run loses at most the pair in
    progress. Methods may be added to a run folder later (only their pairs
    run); changing a method's settings, or a run-wide setting (data, split,
    genes, seed...), is refused.
``predictions/<method>/<test_slide>.h5ad``
    ``.X`` predicted, ``layers["observed"]``, ``layers["uncertainty"]`` (when the
    method has one), ``obsm["spatial"]``, ``var`` = panel genes, normalised scale.
``metrics.csv``
    Long table ``method, fold, test_slide, metric, gene_set, value, n_genes, n_nan``.
``per_gene.csv``
    ``method, fold, test_slide, gene, pcc, pvalue, mse, mean_observed, var_observed``.
``summary.csv``
    Mean and sd over test slides per ``method, metric, gene_set``.
``wilcoxon.csv``, ``top_genes.csv``
    Paired tests between methods (PCC(ACG), PCC(HEG), MSE(ACG)) and the top genes per method.
``models/<method>/<fold>/``
    Fitted models, when ``save_models`` is set.
``report.html``
    Self-contained report (:mod:`he2st.analysis.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st._utils import atomic_path, atomic_write_json, progress
from he2st.errors import He2stInputError
from he2st.evaluate.metrics import N_TOP, summarize, top_genes, wilcoxon_table
from he2st.evaluate.splits import Fold, make_splits

#: Fast methods the demo runs. Later issues append their method names here.
DEMO_METHODS: list[str] = ["mean", "ridge", "knn"]
#: Encoder of the demo: non-neural, needs no weights, a few ms per slide.
DEMO_ENCODER = "color_stats"

#: Files of a run folder.
CONFIG_FILE = "config.json"
FOLDS_DIR = "folds"
PREDICTIONS_DIR = "predictions"

_RESULT_VERSION = 1

#: Column order of metrics.csv and per_gene.csv (fold records are JSON with sorted keys).
METRICS_COLUMNS = ["method", "fold", "test_slide", "metric", "gene_set", "value", "n_genes", "n_nan"]
PER_GENE_COLUMNS = ["method", "fold", "test_slide", "gene", "pcc", "pvalue", "mse", "mean_observed", "var_observed"]


class RunConfigError(He2stInputError):
    """A benchmark configuration (file or arguments) is invalid."""


@dataclass
class MethodSpec:
    """One method configuration of a run: registry name, result label, parameters."""

    name: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on.

    Attributes
    ----------
    out
        Run folder.
    data
        ``"synthetic"``, ``"her2st"``, or a path readable by :func:`he2st.io.read_any`.
    data_params
        Keyword arguments of the dataset builder (e.g. ``{"n_slides": 3}`` for
        synthetic, ``{"sections": ["C2", "C3"]}`` for her2st).
    methods
        Method names, or tables ``{name, label, params, grid}``.
    split
        ``loso`` (default), ``lopo``, ``kfold:K``, ``nested``, or a JSON/TOML split file.
    genes
        Panel recipe: ``"hvg:N"`` (default ``hvg:1000``), ``"all"``, a gene list or file.
    min_spots
        HVG detection filter (default: 1000 capped at 10% of the training spots).
    markers
        Marker genes: kept in the panel and scored as PCC(markers).
    n_top
        Size of the HEG/HVG gene sets (50).
    encoder, weights
        Override the feature encoder (and its weights) of every method that has one.
        With ``encoder`` set and ``weights`` unset, weights are ``"imagenet"`` for
        ``efficientnet_lite0`` and None otherwise.
    patch_px
        Override the patch side (image pixels) of every method that has one. Default:
        each method's own (224 px, for ~0.5-0.7 um/px images), except on the synthetic
        cohort, where it is the cohort's spot pitch (``data_params["patch_px"]``, 32):
        224 px there would span 7 x 7 spots, mostly off the tissue.
    normalization
        Override every method's target normalisation.
    method_params
        ``{label: {param: value}}`` overrides per method.
    grid
        ``{label: {param: [values]}}`` searched on inner folds (split ``nested``).
    seed
        Seed of every method and of k-fold shuffling.
    save_models, clustering, report, quiet
        Save fitted models; add ARI/NMI for labelled slides; write report.html; hide progress.
    name
        Run name shown in the report.
    """

    out: str = "he2st-run"
    data: str = "synthetic"
    data_params: dict[str, Any] = field(default_factory=dict)
    methods: list[Any] = field(default_factory=lambda: list(DEMO_METHODS))
    split: Any = "loso"
    genes: Any = "hvg:1000"
    min_spots: int | None = None
    markers: list[str] | None = None
    n_top: int = N_TOP
    encoder: str | None = None
    weights: str | None = None
    patch_px: int | None = None
    normalization: str | None = None
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    seed: int = 0
    save_models: bool = False
    clustering: bool = True
    report: bool = True
    quiet: bool = False
    name: str | None = None

    # Keys that do not change results: a rerun may differ in them and still resume.
    _VOLATILE = ("out", "quiet", "report", "name")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> BenchmarkConfig:
        """Build from a mapping; unknown keys raise :class:`RunConfigError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RunConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**dict(d))
        cfg.check(where)
        return cfg

    def check(self, where: str = "config") -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise RunConfigError(f"{where}: 'methods' must be a non-empty list")
        if not isinstance(self.n_top, int) or self.n_top < 1:
            raise RunConfigError(f"{where}: n_top must be a positive integer, got {self.n_top!r}")
        if not isinstance(self.seed, int):
            raise RunConfigError(f"{where}: seed must be an integer, got {self.seed!r}")
        labels = [s.label for s in self.method_specs()]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise RunConfigError(f"{where}: method label(s) {dup} appear twice; give each a distinct 'label'")
        from he2st.methods import list_methods

        # Entries for registered methods left out of this run are ignored (a config
        # file may hold settings for more methods than --methods picks); others are typos.
        for key in ("method_params", "grid"):
            extra = sorted(set(getattr(self, key)) - set(labels) - set(list_methods()))
            if extra:
                raise RunConfigError(f"{where}: {key} names method(s) {extra} that are not in 'methods' {labels}")

    def method_specs(self) -> list[MethodSpec]:
        """Methods with their resolved parameters (overrides applied, seed set)."""
        from he2st.methods import get_method_class

        specs = []
        for i, m in enumerate(self.methods):
            if isinstance(m, str):
                name, label, params, grid = m, m, {}, {}
            elif isinstance(m, Mapping) and "name" in m:
                unknown = set(m) - {"name", "label", "params", "grid"}
                if unknown:
                    raise RunConfigError(f"methods[{i}]: unknown key(s) {sorted(unknown)}")
                name, label = str(m["name"]), str(m.get("label", m["name"]))
                params, grid = dict(m.get("params", {})), dict(m.get("grid", {}))
            else:
                raise RunConfigError(f"methods[{i}]: expected a method name or a table with 'name', got {m!r}")
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
                raise RunConfigError(f"method label {label!r}: use letters, digits and _ . + - only")
            klass = get_method_class(name)
            accepted = {**klass.common_defaults, **klass.defaults}
            resolved: dict[str, Any] = {"seed": self.seed}
            if self.encoder is not None and "encoder" in accepted:
                resolved["encoder"] = self.encoder
                if "weights" in accepted:
                    resolved["weights"] = self.weights if self.weights is not None else _default_weights(self.encoder)
            elif self.weights is not None and "weights" in accepted:
                resolved["weights"] = self.weights
            patch_px = self.patch_px
            if patch_px is None and self.data == "synthetic":
                patch_px = int(self.data_params.get("patch_px", _synthetic_patch_px()))
            if patch_px is not None and "patch_px" in accepted:
                resolved["patch_px"] = int(patch_px)
            if self.normalization is not None:
                resolved["normalization"] = self.normalization
            resolved.update(params)
            resolved.update(self.method_params.get(label, {}))
            grid.update(self.grid.get(label, {}))
            unknown = sorted(set(resolved) - set(accepted))
            if unknown:
                raise RunConfigError(f"method {label!r} ({name}): unknown parameter(s) {unknown}; known: {sorted(accepted)}")
            specs.append(MethodSpec(name, label, resolved, grid))
        return specs

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> dict[str, Any]:
        """The run-wide settings every result depends on (compared on resume).

        Methods are not part of it: each (method, fold) result records its own
        resolved method spec, so methods can be added to a run folder later; a
        method whose spec changed is refused (see :func:`run_benchmark`).
        """
        d = self.to_dict()
        for k in (*self._VOLATILE, "methods", "method_params", "grid", "encoder", "weights", "patch_px", "normalization"):
            d.pop(k, None)
        return json.loads(json.dumps(d, sort_keys=True, default=str))


def _synthetic_patch_px() -> int:
    import inspect

    from he2st.datasets import synthetic

    return int(inspect.signature(synthetic).parameters["patch_px"].default)


def _default_weights(encoder: str) -> str | None:
    return "imagenet" if encoder == "efficientnet_lite0" else None


def load_config(path: str | os.PathLike, **overrides: Any) -> BenchmarkConfig:
    """Read a TOML run configuration; ``overrides`` (non-None) replace its keys.

    Nothing in the file is executed: it is parsed with :mod:`tomllib`.
    """
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    return BenchmarkConfig.from_dict(data, where=f"config file {path}")


# -- results -------------------------------------------------------------------------


@dataclass
class RunResult:
    """Tables of a finished (or partly finished) run, read from its folder."""

    out: Path
    metrics: pd.DataFrame
    per_gene: pd.DataFrame
    summary: pd.DataFrame
    wilcoxon: pd.DataFrame
    top_genes: pd.DataFrame
    folds_run: int = 0
    folds_skipped: int = 0
    report: Path | None = None

    def table(self, metrics: Sequence[tuple[str, str]] = (("pcc", "ACG"), ("pcc", "HEG"), ("pcc", "HVG"), ("mse", "ACG"), ("mae", "ACG"))) -> pd.DataFrame:
        """Method x metric table of ``mean`` (and ``sd``) over test slides, e.g. for printing."""
        s = self.summary.set_index(["method", "metric", "gene_set"])
        rows = {}
        for method in dict.fromkeys(self.summary["method"]):
            row = {}
            for metric, gs in metrics:
                key = (method, metric, gs)
                name = f"{metric.upper()}({gs})"
                row[name] = s.loc[key, "mean"] if key in s.index else np.nan
                row[f"{name} sd"] = s.loc[key, "sd"] if key in s.index else np.nan
            rows[method] = row
        return pd.DataFrame.from_dict(rows, orient="index")


def read_run(out: str | os.PathLike) -> RunResult:
    """Load the tables of a run folder written by :func:`run_benchmark`."""
    out = Path(out)
    need = ["metrics.csv", "per_gene.csv", "summary.csv"]
    missing = [n for n in need if not (out / n).is_file()]
    if missing:
        raise He2stInputError(f"run folder {out} lacks {missing}: is the run finished?")
    opt = {n: (pd.read_csv(out / f"{n}.csv") if (out / f"{n}.csv").is_file() else pd.DataFrame()) for n in ("wilcoxon", "top_genes")}
    report = out / "report.html"
    return RunResult(
        out=out,
        metrics=pd.read_csv(out / "metrics.csv"),
        per_gene=pd.read_csv(out / "per_gene.csv"),
        summary=pd.read_csv(out / "summary.csv"),
        wilcoxon=opt["wilcoxon"],
        top_genes=opt["top_genes"],
        report=report if report.is_file() else None,
    )


# -- data ---------------------------------------------------------------------------------


def load_cohort(data: str, params: Mapping[str, Any] | None = None) -> Any:
    """The cohort a run uses: ``synthetic``, ``her2st`` or a path (see :func:`he2st.io.read_any`)."""
    from he2st.data import Cohort

    params = dict(params or {})
    if data == "synthetic":
        from he2st.datasets import synthetic

        return synthetic(**params)
    if data == "her2st":
        from he2st.datasets import her2st

        return her2st(**params)
    if params:
        raise RunConfigError(f"data_params {sorted(params)} only apply to 'synthetic' and 'her2st', not to a path")
    from he2st.io import read_any

    obj = read_any(data)
    if not isinstance(obj, Cohort):
        raise RunConfigError(f"{data!r} holds a single slide; a benchmark needs a cohort of at least 2 slides")
    return obj


# -- the run ---------------------------------------------------------------------------------


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
    from he2st.evaluate.protocol import run_fold

    out = Path(config.out)
    specs = config.method_specs()
    if cohort is None:
        cohort = load_cohort(config.data, config.data_params)
    folds = make_splits(config.split, cohort, seed=config.seed)
    _check_or_write_config(out, config, folds, cohort)
    tested = [s for f in folds for s in f.test]
    per_fold_files = len(set(tested)) < len(tested)

    pairs = [(spec, fold) for spec in specs for fold in folds]
    done = {(spec.label, fold.name): _finished(out, spec, fold) for spec, fold in pairs}
    n_run = n_skip = 0
    for spec, fold in progress(pairs, description="benchmark", total=len(pairs)):
        marker = _marker(out, spec.label, fold.name)
        if done[(spec.label, fold.name)]:
            n_skip += 1
            continue
        _log(config, f"{spec.label}: fold {fold.name} (test {', '.join(fold.test)})")
        outcome = run_fold(
            spec.name,
            spec.params,
            cohort,
            fold,
            config.genes,
            label=spec.label,
            min_spots=config.min_spots,
            markers=config.markers,
            n_top=config.n_top,
            grid=spec.grid or None,
            clustering=config.clustering,
        )
        files = _write_predictions(out, spec.label, fold, outcome, cohort, per_fold_files)
        if config.save_models:
            outcome.model.save(out / "models" / spec.label / _safe(fold.name))
        atomic_write_json(
            marker,
            {
                "version": _RESULT_VERSION,
                "method": spec.label,
                "method_name": spec.name,
                "spec": _spec_record(spec),
                "fold": fold.to_dict(),
                "params": outcome.params,
                "panel": outcome.panel.to_dict(),
                "selection": outcome.selection,
                "missing_genes": {p.slide_id: p.missing_genes for p in outcome.predictions},
                "predictions": files,
                "extra": _jsonable(outcome.model.get_extra()),
                "timings": outcome.timings,
                "metrics": outcome.metrics.to_dict(orient="list"),
                "per_gene": outcome.per_gene.to_dict(orient="list"),
            },
        )
        n_run += 1

    # The tables describe the whole folder: methods of earlier invocations too.
    recorded = json.loads((out / CONFIG_FILE).read_text()).get("methods", [])
    labels = list(dict.fromkeys([m["label"] for m in recorded] + [s.label for s in specs]))
    result = aggregate(out, labels=labels, folds=[f.name for f in folds])
    result.folds_run, result.folds_skipped = n_run, n_skip
    if config.report:
        from he2st.analysis.report import write_report

        result.report = write_report(out)
    return result


def aggregate(out: str | os.PathLike, labels: Sequence[str] | None = None, folds: Sequence[str] | None = None) -> RunResult:
    """Collect the per-(method, fold) results of a run folder into its CSV tables."""
    out = Path(out)
    metrics, per_gene = [], []
    for f in sorted((out / FOLDS_DIR).glob("*/*.json")):
        d = json.loads(f.read_text())
        if labels is not None and d["method"] not in labels:
            continue
        if folds is not None and d["fold"]["name"] not in folds:
            continue
        metrics.append(pd.DataFrame(d["metrics"]))
        per_gene.append(pd.DataFrame(d["per_gene"]))
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
    m = m.sort_values(["method", "fold"], kind="stable").reset_index(drop=True)
    g = g.sort_values(["method", "fold"], kind="stable").reset_index(drop=True)
    m[["method", "fold"]] = m[["method", "fold"]].astype(str)
    g[["method", "fold"]] = g[["method", "fold"]].astype(str)
    summary = summarize(m)
    methods = list(dict.fromkeys(m["method"]))
    wil = []
    for metric, gs in (("pcc", "ACG"), ("pcc", "HEG"), ("mse", "ACG")):
        if len(methods) >= 2 and ((m["metric"] == metric) & (m["gene_set"] == gs)).any():
            t = wilcoxon_table(m, metric, gs, methods)
            t.insert(0, "gene_set", gs)
            t.insert(0, "metric", metric)
            wil.append(t)
    wilcoxon = pd.concat(wil, ignore_index=True) if wil else pd.DataFrame()
    top = top_genes(g, n=20)
    for name, df in (("metrics", m), ("per_gene", g), ("summary", summary), ("wilcoxon", wilcoxon), ("top_genes", top)):
        _write_csv(out / f"{name}.csv", df)
    return RunResult(out=out, metrics=m, per_gene=g, summary=summary, wilcoxon=wilcoxon, top_genes=top)


# -- helpers ---------------------------------------------------------------------------------


def _ordered(df: pd.DataFrame, first: Sequence[str]) -> pd.DataFrame:
    cols = [c for c in first if c in df.columns]
    return df[cols + [c for c in df.columns if c not in cols]]


def _log(config: BenchmarkConfig, msg: str) -> None:
    if not config.quiet and os.environ.get("HE2ST_QUIET", "") in ("", "0"):
        print(f"[he2st] {msg}", file=sys.stderr, flush=True)


def _safe(name: str) -> str:
    """A file-name-safe version of a fold or slide id."""
    s = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name))
    return s if s not in ("", ".", "..") else f"_{s}_"


def _marker(out: Path, label: str, fold: str) -> Path:
    return out / FOLDS_DIR / label / f"{_safe(fold)}.json"


def _spec_record(spec: MethodSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str))


def _finished(out: Path, spec: MethodSpec, fold: Fold) -> bool:
    """Whether (method, fold) has a result; raises if it was made with other method settings."""
    path = _marker(out, spec.label, fold.name)
    if not path.is_file():
        return False
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False  # unreadable: run the pair again (the file is replaced atomically)
    if d.get("version") != _RESULT_VERSION or "metrics" not in d or "spec" not in d:
        return False
    now = _spec_record(spec)
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
    return True


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _write_predictions(out: Path, label: str, fold: Fold, outcome: Any, cohort: Any, per_fold: bool) -> list[str]:
    import anndata as ad

    files = []
    genes = list(outcome.model.genes)
    for p in outcome.predictions:
        slide = cohort[p.slide_id]
        a = ad.AnnData(X=p.predicted, obs=pd.DataFrame(index=slide.obs_names.copy()), var=pd.DataFrame(index=pd.Index(genes)))
        a.layers["observed"] = p.observed
        if p.uncertainty is not None:
            a.layers["uncertainty"] = p.uncertainty
        a.obsm["spatial"] = np.asarray(slide.obsm["spatial"], dtype=np.float64)
        for col in ("array_row", "array_col", "label"):
            if col in slide.obs:
                a.obs[col] = slide.obs[col].to_numpy()
        a.uns["he2st_prediction"] = {
            "method": label,
            "method_name": outcome.model.name,
            "fold": fold.name,
            "slide_id": p.slide_id,
            "normalization": outcome.model.normalizer_.method,
            "missing_genes": list(p.missing_genes),
            "image_path": str(slide.uns.get("he2st", {}).get("image_path") or ""),
            "spot_diameter_px": float(slide.uns.get("he2st", {}).get("spot_diameter_px", 0.0)),
        }
        rel = Path(PREDICTIONS_DIR) / label
        rel = rel / _safe(fold.name) if per_fold else rel
        rel = rel / f"{_safe(p.slide_id)}.h5ad"
        with atomic_path(out / rel, suffix=".h5ad") as tmp:
            a.write_h5ad(tmp, compression="gzip")
        files.append(str(rel))
    return files


def _check_or_write_config(out: Path, config: BenchmarkConfig, folds: list[Fold], cohort: Any) -> None:
    """Write config.json, or check that an existing run used the same configuration."""
    fp = config.fingerprint()
    fold_list = [f.to_dict() for f in folds]
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunConfigError(f"{path} is not valid JSON; remove the run folder or pick another --out") from None
        if old.get("fingerprint") != fp or old.get("folds") != fold_list:
            changed = sorted(k for k in set(fp) | set(old.get("fingerprint", {})) if fp.get(k) != old.get("fingerprint", {}).get(k))
            raise RunConfigError(
                f"run folder {out} holds a run with a different configuration "
                f"(differs in {changed or ['folds']}); use another --out, or delete the folder to start over"
            )
        # Same run-wide settings: record the methods of this invocation (others may be added later).
        methods = {m["label"]: m for m in old.get("methods", [])}
        methods.update({s.label: _spec_record(s) for s in config.method_specs()})
        old.update(config=config.to_dict(), methods=list(methods.values()), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(path, old)
        return
    record = {
        "he2st_run": _RESULT_VERSION,
        "config": config.to_dict(),
        "fingerprint": fp,
        "methods": [_spec_record(s) for s in config.method_specs()],
        "folds": fold_list,
        "cohort": {
            "name": getattr(cohort, "name", ""),
            "slides": list(cohort.slide_ids),
            "patients": dict(cohort.patients),
            "n_spots": {s: int(cohort[s].n_obs) for s in cohort.slide_ids},
        },
        "seeds": {"methods": config.seed, "split": config.seed},
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
    }
    atomic_write_json(path, record)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("he2st", "numpy", "scipy", "scikit-learn", "pandas", "anndata", "torch", "timm", "scanpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    """Commit of the he2st source tree, when it is a git checkout (None otherwise)."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _jsonable(obj: Any) -> Any:
    from he2st._utils import _json_default

    return json.loads(json.dumps(obj, default=_json_default))


# -- entry points for the CLI and the demo ------------------------------------------------------


def config_from_options(config_file: str | os.PathLike | None = None, **options: Any) -> BenchmarkConfig:
    """A configuration from a TOML file (optional) with command-line options (non-None) on top.

    ``methods`` and ``markers`` may be given as comma-separated strings.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    for key in ("methods", "markers"):
        if isinstance(opts.get(key), str):
            opts[key] = [x.strip() for x in opts[key].split(",") if x.strip()]
    if config_file is not None:
        return load_config(config_file, **opts)
    return BenchmarkConfig.from_dict(opts, where="command line")


def demo_config(out: str | os.PathLike = "he2st-demo", seed: int = 0, **overrides: Any) -> BenchmarkConfig:
    """The demo run: the synthetic cohort (4 slides x 300 spots x 50 genes), leave-one-slide-out,
    every method of :data:`DEMO_METHODS`, ``color_stats`` features, all 50 genes.

    HEG/HVG use the top 10 genes (not 50: with a 50-gene panel they would equal ACG).
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


def format_result(result: RunResult) -> str:
    """Printable summary table of a run (PCC(ACG), PCC(HEG), PCC(HVG), MSE, MAE per method)."""
    tab = result.table()
    cols = [c for c in tab.columns if not c.endswith(" sd")]
    lines = [f"{'method':<16}" + "".join(f"{c:>18}" for c in cols)]
    for method, row in tab.iterrows():
        cells = []
        for c in cols:
            m, s = row[c], row[f"{c} sd"]
            cells.append(f"{'n/a':>18}" if pd.isna(m) else f"{m:>10.3f} ± {0.0 if pd.isna(s) else s:<5.3f}")
        lines.append(f"{str(method):<16}" + "".join(cells))
    lines.append(
        f"({result.folds_run} method x fold pairs run, {result.folds_skipped} resumed from {result.out}; "
        "mean ± sd over test slides; n/a: undefined, e.g. PCC of a constant prediction)"
    )
    if result.report is not None:
        lines.append(f"report: {result.report}")
    return "\n".join(lines)
