"""Benchmark configuration: the fields of a run, TOML loading and method-spec resolution.

A run is described by a :class:`BenchmarkConfig` (or a mapping, a TOML file whose
keys are its fields, or command-line options on top of one); :meth:`BenchmarkConfig.method_specs`
resolves each method's parameters (run-wide overrides, per-method overrides, seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from he2st.errors import He2stInputError
from he2st.evaluate.metrics import ALL_METRICS, N_TOP
from he2st.methods.base import param_type_mismatch

#: Fast methods the demo runs. Later issues append their method names here.
DEMO_METHODS: list[str] = ["mean", "ridge", "knn"]
#: Encoder of the demo: non-neural, needs no weights, a few ms per slide.
DEMO_ENCODER = "color_stats"
#: Executors of :mod:`he2st.benchmark.executor`.
EXECUTORS = ("local", "processes", "ray")
#: Configuration keys of the executor: where tasks run, never what they compute.
EXECUTOR_KEYS = ("executor", "workers", "ray_address", "cpus_per_task", "gpus_per_task")


class RunConfigError(He2stInputError):
    """A benchmark configuration (file or arguments) is invalid."""


@dataclass
class MethodSpec:
    """One method configuration of a run: registry name, result label, parameters.

    Built by :meth:`BenchmarkConfig.method_specs`.

    Parameters
    ----------
    name
        Registered method name.
    label
        Name of this configuration in the results (unique within a run).
    params
        Resolved method parameters (seed, run-wide and per-method overrides applied).
    grid
        ``{param: [values]}`` searched on the inner folds (split ``nested``).
    search
        A random search on the inner folds (split ``nested``):
        ``{"method": "random", "n_trials": N, "space": {param: distribution}}``
        (see :func:`he2st.evaluate.protocol.search_candidates`); empty: none.
    """

    name: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON form stored with every result, compared on resume."""
        d = dataclasses.asdict(self)
        if not d["search"]:
            del d["search"]  # records written before random search existed stay comparable
        return json.loads(json.dumps(d, sort_keys=True, default=str))


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on.

    Each parameter is kept as the attribute of the same name.

    Parameters
    ----------
    out
        Run folder.
    data
        ``"synthetic"``, ``"her2st"``, or a path readable by :func:`he2st.datasets.read_any`.
    data_params
        Keyword arguments of the dataset builder (e.g. ``{"n_slides": 3}`` for
        synthetic, ``{"sections": ["C2", "C3"]}`` for her2st).
    methods
        Method names, or tables ``{name, label, params, grid}``.
    split
        ``loso`` (default), ``lopo``, ``kfold:K``, ``nested``, or a JSON/TOML split file.
    genes
        Panel recipe: ``"hvg:N"`` (N genes ranked across the training slides by scanpy's
        batch-aware HVG), ``"hvg_intersect:N"`` (the published per-slide intersection),
        ``"mean:N"``, ``"all"``, a gene list or file. Default (None): the papers' 785-gene
        panel (:func:`he2st.datasets.her2st_panel`) for ``data="her2st"``, ``hvg:1000``
        otherwise; :meth:`check` fills it in.
    min_spots
        HVG detection filter (default: 1000 capped at 10% of the training spots).
    markers
        Marker genes: kept in the panel and scored as PCC(markers).
    n_top
        Size of the HEG/HVG gene sets (50).
    metrics
        Metrics to compute (:func:`he2st.evaluate.metrics.resolve_metrics`), e.g.
        ``["default", "ssim", "mi", "svg"]`` for the defaults and the costly ones;
        None: the cheap defaults (PCC, MSE, MAE, RMSE, Spearman, nRMSE, AUC, JSD).
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
    seeds
        Run every (method, fold) once per seed (the method parameter ``seed``);
        records go to ``folds/<method>/seed<k>/<fold>.json`` and the tables gain a
        ``seed`` column. None (default): one run with ``seed``, today's layout.
    search
        ``{label: {"method": "random", "n_trials": N, "space": {...}}}``: random
        search on inner folds (split ``nested``), see
        :func:`he2st.evaluate.protocol.search_candidates`.
    executor
        Where the tasks run: ``"local"`` (serial, in this process; default),
        ``"processes"`` (a local process pool) or ``"ray"``; or a table
        ``{kind, workers, ray_address, cpus_per_task, gpus_per_task}``
        (:mod:`he2st.benchmark.executor`). Not part of the run's fingerprint: a
        run started with one executor resumes with another.
    workers
        Parallel tasks of ``processes`` (default: CPU count), CPUs of a local Ray instance.
    ray_address
        Address of a running Ray cluster (None: start a local instance).
    cpus_per_task, gpus_per_task
        Resources each Ray task asks for (default 1 CPU, no GPU).
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
    genes: Any = None
    min_spots: int | None = None
    markers: list[str] | None = None
    n_top: int = N_TOP
    metrics: list[str] | None = None
    encoder: str | None = None
    weights: str | None = None
    patch_px: int | None = None
    normalization: str | None = None
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    seed: int = 0
    seeds: list[int] | None = None
    search: dict[str, dict[str, Any]] = field(default_factory=dict)
    executor: Any = "local"
    workers: int | None = None
    ray_address: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    save_models: bool = False
    clustering: bool = True
    report: bool = True
    quiet: bool = False
    name: str | None = None

    # Keys that do not change results: a rerun may differ in them and still resume.
    _VOLATILE = ("out", "quiet", "report", "name", *EXECUTOR_KEYS)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> BenchmarkConfig:
        """Build from a mapping; unknown keys raise :class:`RunConfigError` naming them.

        Parameters
        ----------
        d
            ``{field: value}``; keys are the fields of :class:`BenchmarkConfig`.
        where
            Where the mapping came from, for error messages (e.g. a file name).

        Returns
        -------
        BenchmarkConfig
            The configuration, checked.

        Raises
        ------
        RunConfigError
            On an unknown key or an invalid value (see :meth:`check`).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RunConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**dict(d))
        cfg.check(where)
        return cfg

    def check(self, where: str = "config") -> None:
        """Check every field's type and value, and resolve the method specs.

        Parameters
        ----------
        where
            Where the configuration came from, for error messages.

        Raises
        ------
        RunConfigError
            Naming the key at fault and what was expected.
        """
        if self.genes is None:
            self.genes = default_genes(self.data, self.data_params)
        if isinstance(self.executor, Mapping):
            table = dict(self.executor)
            unknown = sorted(set(table) - {"kind", *EXECUTOR_KEYS[1:]})
            if unknown:
                raise RunConfigError(f"{where}: 'executor' table: unknown key(s) {unknown}; known: kind, {', '.join(EXECUTOR_KEYS[1:])}")
            self.executor = table.pop("kind", "local")
            for k, v in table.items():
                setattr(self, k, v)
        if isinstance(self.cpus_per_task, int) and not isinstance(self.cpus_per_task, bool):
            self.cpus_per_task = float(self.cpus_per_task)
        if isinstance(self.gpus_per_task, int) and not isinstance(self.gpus_per_task, bool):
            self.gpus_per_task = float(self.gpus_per_task)
        for key, (ok, expected) in _FIELD_TYPES.items():
            value = getattr(self, key)
            if not ok(value):
                raise RunConfigError(f"{where}: {key!r} must be {expected}, got {value!r}")
        for key in ("method_params", "grid", "search"):
            for label, table in getattr(self, key).items():
                if not isinstance(table, Mapping):
                    raise RunConfigError(f"{where}: {key!r} of {label!r} must be a table of parameters, got {table!r}")
        for label, table in self.grid.items():
            for param, values in table.items():
                if not isinstance(values, list) or not values:
                    raise RunConfigError(f"{where}: 'grid' of {label!r}: {param!r} must be a non-empty list of values, got {values!r}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise RunConfigError(f"{where}: 'seeds' lists a seed twice: {self.seeds}")
        labels = [s.label for s in self.method_specs()]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise RunConfigError(f"{where}: method label(s) {dup} appear twice; give each a distinct 'label'")
        from he2st.methods import list_methods

        # Entries for registered methods left out of this run are ignored (a config
        # file may hold settings for more methods than --methods picks); others are typos.
        for key in ("method_params", "grid", "search"):
            extra = sorted(set(getattr(self, key)) - set(labels) - set(list_methods()))
            if extra:
                raise RunConfigError(f"{where}: {key} names method(s) {extra} that are not in 'methods' {labels}")

    def method_specs(self) -> list[MethodSpec]:
        """Methods with their resolved parameters (overrides applied, seed set)."""
        from he2st.methods import get_method_class

        specs = []
        for i, m in enumerate(self.methods):
            if isinstance(m, str):
                name, label, params, grid, search = m, m, {}, {}, {}
            elif isinstance(m, Mapping) and "name" in m:
                unknown = set(m) - {"name", "label", "params", "grid", "search"}
                if unknown:
                    raise RunConfigError(f"methods[{i}]: unknown key(s) {sorted(unknown)}")
                name, label = str(m["name"]), str(m.get("label", m["name"]))
                params, grid = m.get("params", {}), m.get("grid", {})
                search = dict(m.get("search", {}) or {})
                if not isinstance(params, Mapping) or not isinstance(grid, Mapping):
                    raise RunConfigError(f"methods[{i}]: 'params' and 'grid' must be tables, got {params!r}, {grid!r}")
                params, grid = dict(params), dict(grid)
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
            search = dict(self.search.get(label, search))
            if search:
                from he2st.evaluate.protocol import check_search

                try:
                    check_search(search, where=f"method {label!r}")
                except He2stInputError as exc:
                    raise RunConfigError(str(exc)) from None
                if grid:
                    raise RunConfigError(f"method {label!r}: give either a 'grid' or a 'search', not both")
            unknown = sorted(set(resolved) - set(accepted))
            if unknown:
                raise RunConfigError(f"method {label!r} ({name}): unknown parameter(s) {unknown}; known: {sorted(accepted)}")
            candidates = [(k, v) for k, v in resolved.items()] + [(k, v) for k, vs in grid.items() for v in vs]
            candidates += [(k, v) for k, d in search.get("space", {}).items() for v in _search_values(d)]
            unknown = sorted(set(search.get("space", {})) - set(accepted))
            if unknown:
                raise RunConfigError(f"method {label!r} ({name}): search over unknown parameter(s) {unknown}; known: {sorted(accepted)}")
            for key, value in candidates:
                expected = param_type_mismatch(value, accepted.get(key))
                if expected:
                    raise RunConfigError(
                        f"method {label!r} ({name}): parameter {key!r} must be {expected} "
                        f"(like its default {accepted[key]!r}), got {value!r}"
                    )
            specs.append(MethodSpec(name, label, resolved, grid, search))
        return specs

    def seed_list(self) -> list[int | None]:
        """The seeds each (method, fold) is fitted with: ``[None]`` (one fit, ``seed``) or ``seeds``.

        Returns
        -------
        list
            ``[None]`` without ``seeds``, else the seeds as integers.
        """
        return [None] if self.seeds is None else [int(s) for s in self.seeds]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> dict[str, Any]:
        """The run-wide settings every result depends on (compared on resume).

        Methods are not part of it: each (method, fold) result records its own
        resolved method spec, so methods can be added to a run folder later; a
        method whose spec changed is refused (see :func:`run_benchmark`).
        """
        d = self.to_dict()
        for k in (*self._VOLATILE, "methods", "method_params", "grid", "search", "encoder", "weights", "patch_px", "normalization"):
            d.pop(k, None)
        if d.get("seeds") is None:
            d.pop("seeds", None)  # run folders written before seeds existed keep their fingerprint
        return json.loads(json.dumps(d, sort_keys=True, default=str))


def _search_values(dist: Any) -> list[Any]:
    """Values to type-check of one search distribution (its choices, or its bounds)."""
    if isinstance(dist, Mapping) and len(dist) == 1:
        (kind, v), = dist.items()
        if isinstance(v, list):
            return [float(x) for x in v] if kind in ("uniform", "loguniform") and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) else list(v)
    return []


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(g, str) for g in x)


def _optional(check: Any) -> Any:
    return lambda x: x is None or check(x)


# Field -> (test, what is expected): TOML gives any type, and a wrong one would
# otherwise surface as a TypeError deep in the run (or be silently misread).
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "out": (lambda x: isinstance(x, (str, os.PathLike)), "a folder path"),
    "data": (lambda x: isinstance(x, (str, os.PathLike)), "a dataset name or path"),
    "data_params": (lambda x: isinstance(x, Mapping), "a table of dataset arguments"),
    "methods": (lambda x: isinstance(x, list) and len(x) > 0, "a non-empty list of method names or tables"),
    "split": (lambda x: isinstance(x, (str, os.PathLike, Mapping, list)), "a split name or file"),
    # str, a list of genes, or (Python API) a GenePanel / path.
    "genes": (lambda x: isinstance(x, (str, os.PathLike)) or _is_str_list(x) or hasattr(x, "genes"),
              "'hvg:N', 'all', a gene-list file or a list of gene names"),
    "min_spots": (_optional(lambda x: _is_int(x) and x >= 0), "a non-negative integer"),
    "markers": (_optional(_is_str_list), "a list of gene names"),
    "n_top": (lambda x: _is_int(x) and x >= 1, "a positive integer"),
    "metrics": (_optional(lambda x: _is_str_list(x) and not (set(map(str.lower, x)) - {*ALL_METRICS, "default", "all"})),
                f"a list of metric names from {['default', 'all', *ALL_METRICS]}"),
    "encoder": (_optional(lambda x: isinstance(x, str)), "an encoder name"),
    "weights": (_optional(lambda x: isinstance(x, (str, os.PathLike))), "'imagenet' or a weights file"),
    "patch_px": (_optional(lambda x: _is_int(x) and x >= 1), "a positive integer (pixels)"),
    "normalization": (_optional(lambda x: isinstance(x, str)), "a normalisation name"),
    "method_params": (lambda x: isinstance(x, Mapping), "a table {method: {parameter: value}}"),
    "grid": (lambda x: isinstance(x, Mapping), "a table {method: {parameter: [values]}}"),
    "seed": (_is_int, "an integer"),
    "seeds": (_optional(lambda x: isinstance(x, list) and len(x) > 0 and all(_is_int(s) for s in x)), "a non-empty list of integers"),
    "search": (lambda x: isinstance(x, Mapping), "a table {method: {method, n_trials, space}}"),
    "executor": (lambda x: x in EXECUTORS, f"one of {list(EXECUTORS)} (or a table with 'kind')"),
    "workers": (_optional(lambda x: _is_int(x) and x >= 1), "a positive integer"),
    "ray_address": (_optional(lambda x: isinstance(x, str) and x != ""), "a Ray address such as 'ray://host:10001' or 'auto'"),
    "cpus_per_task": (lambda x: isinstance(x, float) and x > 0, "a positive number of CPUs"),
    "gpus_per_task": (lambda x: isinstance(x, float) and x >= 0, "a non-negative number of GPUs"),
    "save_models": (lambda x: isinstance(x, bool), "true or false"),
    "clustering": (lambda x: isinstance(x, bool), "true or false"),
    "report": (lambda x: isinstance(x, bool), "true or false"),
    "quiet": (lambda x: isinstance(x, bool), "true or false"),
    "name": (_optional(lambda x: isinstance(x, str)), "a run name"),
}


#: The panel of ``genes`` when the configuration gives none and the data is not her2st.
DEFAULT_GENES = "hvg:1000"


def default_genes(data: Any, data_params: Mapping[str, Any] | None = None) -> Any:
    """The gene panel of a run that names none.

    ``data="her2st"``: the papers' 785-gene panel file (Hist2ST's
    ``her_hvg_cut_1000.npy``, read by :func:`he2st.datasets.her2st_panel`), so the
    benchmark scores what the papers score; anything else: :data:`DEFAULT_GENES`.

    Parameters
    ----------
    data
        The dataset (``BenchmarkConfig.data``).
    data_params
        Its arguments (``root`` is used for her2st).

    Returns
    -------
    str
        A gene spec (``hvg:1000``) or the path of the panel file.
    """
    if str(data).lower() != "her2st":
        return DEFAULT_GENES
    from he2st.datasets import her2st_panel_path

    return str(her2st_panel_path((data_params or {}).get("root")))


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


def config_from_options(config_file: str | os.PathLike | None = None, **options: Any) -> BenchmarkConfig:
    """A configuration from a TOML file (optional) with command-line options (non-None) on top.

    ``methods`` and ``markers`` may be given as comma-separated strings.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    for key in ("methods", "markers"):
        if isinstance(opts.get(key), str):
            opts[key] = [x.strip() for x in opts[key].split(",") if x.strip()]
    if isinstance(opts.get("seeds"), str):
        try:
            opts["seeds"] = [int(x) for x in opts["seeds"].split(",") if x.strip()]
        except ValueError:
            raise RunConfigError(f"--seeds: expected integers separated by commas, got {opts['seeds']!r}") from None
    if config_file is not None:
        return load_config(config_file, **opts)
    return BenchmarkConfig.from_dict(opts, where="command line")
