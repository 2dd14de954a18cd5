"""``he2st train``: fit one method on every slide of a dataset and save it as a model folder with its card.

::

    from he2st.benchmark.train import train_model
    result = train_model("model/", data="synthetic", method="ridge", genes="hvg:50", cv=True)
    result.card["cv_metrics"]["summary"]

The gene panel is chosen from the training slides with the benchmark's recipe
(:func:`he2st.evaluate.protocol.choose_panel`), and method parameters resolve as
in a benchmark (:class:`he2st.benchmark.config.BenchmarkConfig`: run-wide
``encoder``/``weights``/``patch_px``, per-method tables of a ``--config`` TOML
file, the synthetic cohort's patch size). With ``cv=True`` a leave-one-slide-out
cross-validation on the training slides (each fold choosing its own panel, as
:func:`he2st.evaluate.protocol.run_fold` does) is stored in the card.

This lives in the benchmark stage, not in :mod:`he2st.inference`, because it
uses the evaluation protocol (panel recipe, folds, metrics), which sits above
inference in the pipeline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from he2st.benchmark.config import (
    BenchmarkConfig,
    MethodSpec,
    RunConfigError,
    config_from_options,
)
from he2st.errors import He2stInputError


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Parameters
    ----------
    out
        The model folder.
    model
        The fitted method.
    card
        The model card as written (``card.json``).
    config
        The resolved configuration (data, genes, seed ...).
    spec
        The method, label and resolved parameters.
    """

    out: Path
    model: Any
    card: dict[str, Any]
    config: BenchmarkConfig
    spec: MethodSpec
    seconds: dict[str, float] = field(default_factory=dict)


def parse_params(items: Sequence[str] | str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Method parameters from the command line: JSON objects and ``key=value`` items.

    Parameters
    ----------
    items
        Strings, each a JSON object (``'{"epochs": 5}'``) or ``key=value`` whose
        value is read as JSON when it parses (``alpha=0.5``, ``tta=true``,
        ``alphas=[1,10]``) and kept as text otherwise (``encoder=color_stats``);
        or a mapping, returned as a dict.

    Returns
    -------
    dict
        The parameters; later items override earlier ones.

    Raises
    ------
    he2st.errors.He2stInputError
        An item that is neither a JSON object nor ``key=value``.
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    out: dict[str, Any] = {}
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise He2stInputError(f"--params {text!r}: not a valid JSON object ({exc.msg})") from None
            if not isinstance(value, dict):
                raise He2stInputError(f"--params {text!r}: expected a JSON object")
            out.update(value)
            continue
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise He2stInputError(f"--params {text!r}: expected key=value or a JSON object")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def train_config(
    config_file: str | os.PathLike | None = None,
    *,
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[BenchmarkConfig, MethodSpec]:
    """The configuration of a training run and its one method, resolved and checked.

    Parameters
    ----------
    config_file
        Optional TOML run configuration (:class:`BenchmarkConfig` keys); options
        given here override it. Its ``methods`` entry for ``method`` (matched by
        label, then name) supplies that method's parameters.
    method
        The method to train; may be omitted when the file lists exactly one.
    params
        Parameters of the method, on top of the file's.
    **options
        Other :class:`BenchmarkConfig` fields (``data``, ``data_params``,
        ``genes``, ``seed``, ``encoder``, ``weights``, ``patch_px``,
        ``min_spots``, ``markers``); None leaves the file's value or the default.

    Returns
    -------
    config : BenchmarkConfig
        The configuration, with ``methods`` reduced to the one trained.
    spec : MethodSpec
        That method with its resolved parameters.

    Raises
    ------
    he2st.benchmark.config.RunConfigError
        No method named (or several in the file), or a bad option.
    """
    base = config_from_options(config_file, **{k: v for k, v in options.items() if k != "methods"})
    entry: Any = None
    if method is None:
        if len(base.methods) != 1 or config_file is None:
            raise RunConfigError("name the method to train with --method (e.g. --method ridge)")
        entry = base.methods[0]
    else:
        for m in base.methods if config_file is not None else []:
            name = m if isinstance(m, str) else (m.get("label") or m.get("name")) if isinstance(m, Mapping) else None
            if name == method:
                entry = m
                break
        if entry is None and config_file is not None:
            for m in base.methods:
                if isinstance(m, Mapping) and m.get("name") == method:
                    entry = m
                    break
        if entry is None:
            entry = method
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(entry)
    if params:
        entry["params"] = {**dict(entry.get("params") or {}), **dict(params)}
    entry.pop("grid", None)  # one model is trained: no grid search here
    d = base.to_dict()
    d["methods"] = [entry]
    d["grid"] = {}
    cfg = BenchmarkConfig.from_dict(d, where=f"config file {config_file}" if config_file else "command line")
    return cfg, cfg.method_specs()[0]


def _cv_metrics(spec: MethodSpec, cohort: Any, cfg: BenchmarkConfig) -> dict[str, Any]:
    """Leave-one-slide-out on the training slides, scored as the benchmark scores a fold."""
    import pandas as pd

    from he2st.evaluate.metrics import summarize
    from he2st.evaluate.protocol import run_fold
    from he2st.evaluate.splits import make_splits

    folds = make_splits("loso", cohort, seed=cfg.seed)
    tables = []
    for fold in folds:
        outcome = run_fold(
            spec.name, spec.params, cohort, fold, cfg.genes, label=spec.label, min_spots=cfg.min_spots,
            markers=cfg.markers, n_top=cfg.n_top, clustering=False,
        )
        tables.append(outcome.metrics)
    metrics = pd.concat(tables, ignore_index=True)
    summary = summarize(metrics)
    keep = [("pcc", "ACG"), ("pcc", "HEG"), ("pcc", "HVG"), ("mse", "ACG"), ("mae", "ACG")]
    per_fold = []
    for slide_id, g in metrics.groupby("test_slide", sort=False):
        row: dict[str, Any] = {"test_slide": str(slide_id)}
        for metric, gs in keep:
            sel = g[(g["metric"] == metric) & (g["gene_set"] == gs)]
            if len(sel):
                row[f"{metric.upper()}({gs})"] = float(sel["value"].iloc[0])
        per_fold.append(row)
    table = {}
    for metric, gs in keep:
        sel = summary[(summary["metric"] == metric) & (summary["gene_set"] == gs)]
        if len(sel):
            table[f"{metric.upper()}({gs})"] = {"mean": float(sel["mean"].iloc[0]), "sd": float(sel["sd"].iloc[0])}
    return {"split": "loso", "n_folds": len(folds), "genes": str(cfg.genes), "summary": table, "folds": per_fold}


def train_model(
    out: str | os.PathLike,
    *,
    data: str | None = None,
    method: str | None = None,
    params: Mapping[str, Any] | Sequence[str] | str | None = None,
    genes: Any = None,
    config_file: str | os.PathLike | None = None,
    cv: bool = False,
    cohort: Any = None,
    **options: Any,
) -> TrainResult:
    """Fit a method on every slide of a dataset and save the model folder with its card.

    Parameters
    ----------
    out
        The model folder (see :func:`he2st.inference.save_model`); checked
        before anything is trained.
    data
        ``"synthetic"`` (default), ``"her2st"`` or a dataset path
        (:func:`he2st.datasets.load`).
    method
        Registered method name (or a label of the config file's methods).
    params
        Method parameters: a mapping, or command-line items (see :func:`parse_params`).
    genes
        Panel recipe, as the benchmark takes it: ``hvg:N`` (default ``hvg:1000``),
        ``mean:N``, ``all``, or a gene-list file.
    config_file
        Optional TOML run configuration (see :func:`train_config`).
    cv
        Also run leave-one-slide-out on the training slides and store its
        metrics in the card (``cv_metrics``).
    cohort
        A cohort to train on instead of loading ``data`` (``data`` is then only recorded).
    **options
        Other configuration fields (``seed``, ``encoder``, ``weights``,
        ``patch_px``, ``min_spots``, ``markers``, ``data_params``).

    Returns
    -------
    TrainResult
        The folder, the fitted model, its card and the resolved configuration.

    Raises
    ------
    he2st.errors.He2stInputError
        A bad option, method parameter, gene spec or dataset, or an ``out`` that
        is a non-empty folder holding no model; nothing is written then.
    """
    import time

    from he2st.datasets import load as load_cohort
    from he2st.evaluate.protocol import check_gene_spec, choose_panel
    from he2st.inference.card import check_model_dir, save_model
    from he2st.methods import create_method

    t0 = time.perf_counter()
    check_model_dir(out)
    cfg, spec = train_config(config_file, method=method, params=parse_params(params), data=data, genes=genes, **options)
    check_gene_spec(cfg.genes)
    create_method(spec.name, **spec.params)  # the method's own checks of its parameters, before any data
    if cohort is None:
        cohort = load_cohort(cfg.data, cfg.data_params)
    slides = list(cohort)
    if len(slides) < 1:
        raise He2stInputError(f"data {cfg.data!r} holds no slide to train on")
    t1 = time.perf_counter()
    cv_metrics = None
    if cv:
        if len(slides) < 2:
            raise He2stInputError(f"--cv needs at least 2 training slides; data {cfg.data!r} has {len(slides)}")
        cv_metrics = _cv_metrics(spec, cohort, cfg)
    t2 = time.perf_counter()
    panel = choose_panel(slides, cfg.genes, min_spots=cfg.min_spots, markers=cfg.markers)
    model = create_method(spec.name, **spec.params).fit(slides, panel)
    t3 = time.perf_counter()
    options_record = {
        "data": str(cfg.data),
        "data_params": cfg.data_params,
        "genes": cfg.genes if isinstance(cfg.genes, (str, list)) else str(cfg.genes),
        "min_spots": cfg.min_spots,
        "markers": cfg.markers,
        "seed": cfg.seed,
        "method_spec": spec.record(),
        "config_file": None if config_file is None else str(config_file),
        "panel": {"source": getattr(panel, "source", ""), "params": getattr(panel, "params", {})},
        "seconds": {"load": round(t1 - t0, 3), "cv": round(t2 - t1, 3), "fit": round(t3 - t2, 3)},
    }
    path = save_model(model, out, training_slides=slides, cv_metrics=cv_metrics, options=options_record)
    from he2st.inference.card import read_card

    return TrainResult(out=path, model=model, card=read_card(path), config=cfg, spec=spec,
                       seconds={"load": t1 - t0, "cv": t2 - t1, "fit": t3 - t2, "total": time.perf_counter() - t0})


def format_training(result: TrainResult) -> str:
    """Human-readable lines for a :func:`train_model` result (``he2st train`` prints them)."""
    card = result.card
    tr = card["training"]
    lines = [
        f"trained {card['method']} on {len(tr['slides'])} slides ({len(tr['patients'])} patients, {tr['n_spots']} spots), "
        f"{card['n_genes']} genes, scale {card['normalization'].get('evaluation')}",
    ]
    cvm = card.get("cv_metrics")
    if cvm:
        parts = [f"{k} {v['mean']:.3f}" for k, v in cvm["summary"].items()]
        lines.append(f"leave-one-slide-out on the training slides: {', '.join(parts)}")
    lines.append(f"model: {result.out}  ({result.seconds.get('total', 0.0):.1f} s)")
    return "\n".join(lines)
