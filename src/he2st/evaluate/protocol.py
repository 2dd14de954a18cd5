"""The evaluation protocol of one fold: panel, fit, predict, score -- leak-free by construction.

For a fold (training, validation and test slide ids) and a method:

1. the gene panel is chosen from the fold's TRAINING slides only
   (:func:`choose_panel`: HVG recipe, all shared genes, or a fixed list
   intersected with the genes of the training slides);
2. the method is fitted on the training slides (validation slides are passed
   as ``val_slides`` when the fold's ``val_mode`` is ``"select"``; with
   ``"score"`` -- Jiang et al.'s out-of-distribution protocol, the default of
   split files -- they are kept from the method and scored like test slides,
   as an in-distribution test, into ``FoldOutcome.validation_metrics``); it fits its target normaliser, stain reference, scalers,
   PCA and retrieval banks on what it is given, so nothing about a test slide
   can reach the model;
3. each test slide is predicted, and its observed values are
   ``method.targets(test)`` -- the test counts put on the panel with the
   normaliser fitted on the training slides;
4. predictions are scored with :func:`he2st.evaluate.metrics.evaluate_slide`
   (and, when the slide has ``obs["label"]``, ARI/NMI of k-means clusters of
   the predictions against the labels).

Panel genes missing from a test slide cannot be scored there: they are left
out of its metrics and reported in ``missing_genes`` (their observed column
is NaN in the written predictions), never filled with zeros.

With nested folds (``fold.inner``) and a hyper-parameter grid, each candidate
is scored on the inner folds (mean PCC(ACG) over inner test slides, every
inner fold choosing its own panel from its own training slides) and the best
one is refitted on the outer training slides; the outer test slide is never
consulted.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from he2st.data.slide import meta
from he2st.errors import GenePanelError, He2stInputError
from he2st.evaluate.metrics import (
    N_TOP,
    SPATIAL_METRICS,
    check_n_top,
    evaluate_slide,
    metrics_frame,
    per_gene_frame,
    resolve_metrics,
)
from he2st.evaluate.splits import VALIDATION_MODES, Fold

#: Default HVG filter: published value for her2st-sized cohorts (about 11k spots).
PUBLISHED_MIN_SPOTS = 1000
#: With fewer training spots, ``min_spots`` defaults to this share of them.
MIN_SPOTS_FRACTION = 0.1


# -- gene panel --------------------------------------------------------------------


def choose_panel(
    train_slides: Sequence[Any],
    genes: Any = "hvg:1000",
    min_spots: int | None = None,
    markers: Sequence[str] | None = None,
) -> Any:
    """The gene panel of a fold, read from its training slides only.

    Parameters
    ----------
    train_slides
        The fold's training slides (never the test slides).
    genes
        ``"hvg:N"`` -- N genes ranked across the training slides by scanpy's
        batch-aware ``highly_variable_genes`` (``batch_key`` = slide; exactly N
        when enough genes pass the detection filter; ``combine="batch"`` of
        :func:`he2st.pp.genes.select_genes`); ``"hvg_intersect:N"`` -- the
        published HisToGene/Hist2ST/mclSTExp recipe: the N most variable genes of
        each training slide, intersected (often far fewer than N genes: 29-41 on
        her2st leave-one-out folds with N=1000);
        ``"mean:N"`` -- the N genes of highest mean count over the training
        spots (ST-Net's ``--gene_n``); ``"all"`` -- every gene present in all
        training slides; a list of genes,
        a :class:`~he2st.pp.genes.GenePanel` or a file (``.npy``/``.json``/text)
        -- that list intersected with the genes present in all training slides.
    min_spots
        HVG mode: minimum training spots where a gene is detected. Default:
        1000 (the published value), capped at 10% of the training spots so small
        cohorts keep genes.
    markers
        Genes kept whenever present in every training slide.

    Returns
    -------
    he2st.pp.genes.GenePanel
        ``params["slides"]`` records the slides that were read.
    """
    from he2st.pp.genes import GenePanel, common_genes, select_genes

    slides = list(train_slides)
    hvg = _hvg_kind(genes)
    if hvg is not None:
        n_top = _spec_n(genes, hvg, default=1000)
        if min_spots is None:
            n_spots = sum(s.n_obs for s in slides)
            min_spots = int(min(PUBLISHED_MIN_SPOTS, np.floor(MIN_SPOTS_FRACTION * n_spots)))
        combine = "intersect" if hvg == "hvg_intersect" else "batch"
        return select_genes(slides, min_spots=min_spots, n_top_hvg=n_top, combine=combine, markers=markers)
    if isinstance(genes, str) and genes.lower().startswith("mean:"):
        return _top_mean_panel(slides, genes, markers)
    if isinstance(genes, str) and genes.lower() == "all":
        common = common_genes(slides)
        panel = select_genes(slides, gene_list=common, markers=markers)
        return GenePanel(panel.genes, source="all", params=panel.params)
    if genes is None:
        raise He2stInputError("gene spec is None: use 'hvg:N', 'all', a list of genes or a file")
    return select_genes(slides, gene_list=genes, markers=markers)


def check_gene_spec(genes: Any) -> None:
    """Check a gene spec without reading any slide, so a run can refuse it before writing.

    Parameters
    ----------
    genes
        As :func:`choose_panel` takes it.

    Raises
    ------
    he2st.errors.He2stInputError
        A malformed ``hvg:N``, ``hvg_intersect:N`` or ``mean:N``, None, or a gene list (file) that cannot be read.
    """
    from he2st.pp.genes import read_gene_list

    hvg = _hvg_kind(genes)
    if hvg is not None:
        _spec_n(genes, hvg, default=1000)
    elif isinstance(genes, str) and genes.lower().startswith("mean:"):
        _spec_n(genes, "mean")
    elif genes is None:
        raise He2stInputError("gene spec is None: use 'hvg:N', 'all', a list of genes or a file")
    elif not (isinstance(genes, str) and genes.lower() == "all"):
        read_gene_list(genes)


def _hvg_kind(genes: Any) -> str | None:
    """``"hvg_intersect"`` or ``"hvg"`` for an HVG gene spec, else None."""
    if not isinstance(genes, str):
        return None
    low = genes.lower()
    if low.startswith("hvg_intersect"):
        return "hvg_intersect"
    return "hvg" if low.startswith("hvg") else None


def _spec_n(genes: str, kind: str, default: int | None = None) -> int:
    """N of a ``hvg:N`` / ``mean:N`` gene spec (``hvg`` alone: ``default``)."""
    _, _, n = genes.partition(":")
    try:
        n_top = int(n) if n or default is None else default
    except ValueError:
        n_top = 0
    if n_top < 1:
        raise He2stInputError(f"gene spec {genes!r}: expected {kind}:N with a positive integer N")
    return n_top


def _top_mean_panel(slides: list[Any], spec: str, markers: Sequence[str] | None) -> Any:
    """ST-Net's ``--gene_n N``: the N genes of highest mean count over all training spots."""
    from he2st.pp.genes import GenePanel, common_genes, select_genes

    n_top = _spec_n(spec, "mean")
    common = common_genes(slides)
    total = np.zeros(len(common))
    for s in slides:
        total += np.asarray(s[:, common].X.sum(axis=0), dtype=np.float64).reshape(-1)
    order = np.argsort(-total, kind="stable")[:n_top]
    panel = select_genes(slides, gene_list=[common[i] for i in order], markers=markers)
    return GenePanel(panel.genes, source="mean", params={**panel.params, "n_top_mean": n_top})


# -- one fold ------------------------------------------------------------------------


@dataclass
class SlidePrediction:
    """Predictions of one test slide, on the fold's panel and normalised scale.

    Parameters
    ----------
    slide_id
        Id of the test slide.
    predicted
        Predicted values, ``(n_spots, n_panel_genes)``, on the normalised scale
        of the method's target normaliser.
    observed
        Observed values on the same panel and scale; the columns of panel genes
        missing from the slide are NaN.
    uncertainty
        Per-value predictive uncertainty with the shape of ``predicted``, or
        None when the method gives none.
    missing_genes
        Panel genes absent from the slide (left out of its metrics).
    """

    slide_id: str
    predicted: np.ndarray
    observed: np.ndarray  # NaN columns for panel genes missing from the slide
    uncertainty: np.ndarray | None
    missing_genes: list[str]


@dataclass
class FoldOutcome:
    """What :func:`run_fold` returns for one (method, fold).

    Parameters
    ----------
    method
        Name of the method configuration (the ``label`` of :func:`run_fold`).
    fold
        Name of the fold.
    panel
        The gene panel chosen on the fold's training slides
        (:class:`he2st.pp.genes.GenePanel`).
    model
        The fitted method instance.
    predictions
        One :class:`SlidePrediction` per test slide.
    metrics
        Long metrics table of every test slide, with ``method``, ``fold`` and
        ``test_slide`` columns in front.
    per_gene
        Per-gene table of every test slide, with the same key columns.
    params
        The fitted model's parameters (after grid selection, if any).
    selection
        Record of the grid search (see :func:`select_params`); empty without a grid.
    validation_predictions, validation_metrics, validation_per_gene
        With ``val_mode="score"``: the validation slides' predictions and
        tables (same key columns, ``test_slide`` naming the validation
        slide), scored as an in-distribution test; empty/None otherwise.
    timings
        Seconds spent in ``select_s`` (grid search), ``fit_s`` and ``predict_s``
        (prediction and scoring).
    """

    method: str
    fold: str
    panel: Any
    model: Any
    predictions: list[SlidePrediction]
    metrics: pd.DataFrame
    per_gene: pd.DataFrame
    params: dict[str, Any]
    selection: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    validation_predictions: list[SlidePrediction] = field(default_factory=list)
    validation_metrics: pd.DataFrame | None = None
    validation_per_gene: pd.DataFrame | None = None


def resolve_slides(cohort: Any, ids: Sequence[str]) -> list[Any]:
    """Slides of ``cohort`` by id, with an error naming a missing one.

    Parameters
    ----------
    cohort
        Anything indexable by slide id (a :class:`he2st.data.Cohort`).
    ids
        Slide ids, in the order wanted.

    Returns
    -------
    list
        The slides, in the order of ``ids``.

    Raises
    ------
    he2st.errors.He2stInputError
        When an id is not in the cohort.
    """
    out = []
    for i in ids:
        try:
            out.append(cohort[i])
        except KeyError:
            raise He2stInputError(f"slide {i!r} is not in cohort {getattr(cohort, 'name', '')!r}") from None
    return out


def fit_on(
    method_name: str,
    params: Mapping[str, Any],
    train: Sequence[Any],
    val: Sequence[Any],
    genes: Any,
    min_spots: int | None = None,
    markers: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """Choose the panel on ``train`` and fit a new method instance; returns (panel, model).

    Parameters
    ----------
    method_name
        Registered method name (see :func:`he2st.methods.create_method`).
    params
        Parameters of the method.
    train
        Training slides: the panel is chosen on them and the method fitted on them.
    val
        Validation slides, passed to ``fit`` as ``val_slides`` (None when empty).
    genes, min_spots, markers
        Panel recipe, see :func:`choose_panel`.

    Returns
    -------
    panel : he2st.pp.genes.GenePanel
        The panel chosen on ``train``.
    model : he2st.methods.base.Method
        A new, fitted method instance.
    """
    from he2st.methods import create_method

    panel = choose_panel(train, genes, min_spots=min_spots, markers=markers)
    model = create_method(method_name, **dict(params))
    model.fit(list(train), panel, val_slides=list(val) or None)
    return panel, model


def predict_slide(model: Any, slide: Any) -> SlidePrediction:
    """Predict one test slide and put its observed values on the model's panel and scale.

    Parameters
    ----------
    model
        A fitted method.
    slide
        The test slide.

    Returns
    -------
    SlidePrediction
        Predictions, observed values (NaN columns for panel genes the slide
        lacks) and uncertainty, if the method gives one.

    Raises
    ------
    he2st.errors.He2stInputError
        When the predictions (or the uncertainty) have the wrong shape, or the
        predictions hold NaN or inf.
    """
    sid = meta(slide).slide_id
    genes = list(model.genes)
    present = set(map(str, slide.var_names))
    missing = [g for g in genes if g not in present]
    pred = np.asarray(model.predict(slide), dtype=np.float32)
    if pred.shape != (slide.n_obs, len(genes)):
        raise He2stInputError(
            f"method {model.name!r} returned predictions of shape {pred.shape} for slide {sid!r} "
            f"({slide.n_obs} spots x {len(genes)} genes expected)"
        )
    if not np.isfinite(pred).all():
        raise He2stInputError(f"method {model.name!r} predicted NaN/inf values for slide {sid!r}")
    if missing:
        obs = np.asarray(model.normalizer_.transform(slide, genes, fill_missing=True), dtype=np.float32)
        obs[:, [genes.index(g) for g in missing]] = np.nan
    else:
        obs = np.asarray(model.targets(slide), dtype=np.float32)
    unc = model.predict_uncertainty(slide)
    if unc is not None:
        unc = np.asarray(unc, dtype=np.float32)
        if unc.shape != pred.shape:
            raise He2stInputError(f"method {model.name!r}: uncertainty shape {unc.shape} != predictions {pred.shape}")
    return SlidePrediction(sid, pred, obs, unc, missing)


def score_prediction(
    p: SlidePrediction,
    genes: Sequence[str],
    markers: Sequence[str] | None = None,
    n_top: int = N_TOP,
    labels: Sequence[Any] | None = None,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics (long) and per-gene table of one slide; genes missing from the slide are left out.

    Parameters
    ----------
    p
        The slide's predictions (:func:`predict_slide`).
    genes
        The panel genes, in the column order of ``p.predicted``.
    markers
        Marker genes scored as their own gene set (those present in the slide).
    n_top
        Size of the HEG/HVG sets.
    labels
        Spot labels (``obs["label"]``); with two classes or more, ARI and NMI
        rows (k-means clusters of the predictions against the labels) are added.
    seed
        Seed of the k-means clustering.
    metrics
        Metrics to compute (see :func:`he2st.evaluate.metrics.evaluate_slide`; None: the defaults).
    grid
        The slide's spot grid (:func:`he2st.evaluate.field_metrics.spot_grid`), for SSIM and SVG.

    Returns
    -------
    metrics : pandas.DataFrame
        Long table ``metric, gene_set, value, n_genes, n_nan``.
    per_gene : pandas.DataFrame
        One row per scored gene.

    Raises
    ------
    he2st.errors.GenePanelError
        When the slide has none of the panel genes.
    """
    keep = [i for i, g in enumerate(genes) if g not in set(p.missing_genes)]
    if not keep:
        raise GenePanelError(f"slide {p.slide_id!r} has none of the {len(genes)} panel genes")
    kept = [genes[i] for i in keep]
    mk = [m for m in markers if m in set(kept)] if markers else None
    ev = evaluate_slide(
        p.observed[:, keep], p.predicted[:, keep], kept, markers=mk or None, n_top=n_top, metrics=metrics, grid=grid
    )
    metrics = ev.metrics
    if labels is not None:
        from he2st.evaluate.clustering import cluster_agreement

        lab = list(labels)
        n_classes = len({str(v) for v in lab if v is not None and str(v) not in ("nan", "")})
        if n_classes >= 2:
            ca = cluster_agreement(
                p.observed[:, keep], p.predicted[:, keep], labels=lab, seed=seed, observed_reference=False
            )
            extra = pd.DataFrame(
                [("ari", "ACG", ca["ari"], len(keep), 0), ("nmi", "ACG", ca["nmi"], len(keep), 0)],
                columns=metrics.columns,
            )
            metrics = pd.concat([metrics, extra], ignore_index=True)
    ev.metrics = metrics
    return metrics_frame(ev), per_gene_frame(ev)


def run_fold(
    method_name: str,
    params: Mapping[str, Any],
    cohort: Any,
    fold: Fold,
    genes: Any = "hvg:1000",
    *,
    label: str | None = None,
    min_spots: int | None = None,
    markers: Sequence[str] | None = None,
    n_top: int = N_TOP,
    grid: Mapping[str, Sequence[Any]] | None = None,
    search: Mapping[str, Any] | None = None,
    clustering: bool = True,
    validation: str | None = None,
    metrics: Sequence[str] | None = None,
) -> FoldOutcome:
    """Run the protocol for one method on one fold (see the module docstring).

    Parameters
    ----------
    method_name, params
        Registered method and its parameters.
    cohort
        The cohort holding every slide the fold names.
    fold
        Slide ids; ``fold.inner`` is used for ``grid`` search.
    genes, min_spots, markers
        Panel recipe, see :func:`choose_panel`.
    label
        Name of this method configuration in the results (default ``method_name``).
    n_top
        Size of the HEG/HVG sets.
    grid
        Optional ``{param: [values]}`` searched on ``fold.inner``.
    search
        Optional random search (:func:`search_candidates`) on ``fold.inner``,
        its sampler seeded by the method's ``seed``.
    clustering
        Add ARI/NMI rows for test slides with ``obs["label"]``.
    validation
        ``"select"`` (validation slides passed to ``fit``) or ``"score"``
        (kept from the method and scored as an in-distribution test);
        None: ``fold.val_mode``.
    metrics
        Metrics to compute (see :func:`he2st.evaluate.metrics.evaluate_slide`; None: the
        cheap defaults). A :class:`~he2st.evaluate.metrics.GeneSetSizeWarning` is emitted
        once for the fold when ``n_top`` is not smaller than its panel.

    Returns
    -------
    FoldOutcome
        Panel, fitted model, predictions, metrics and per-gene tables (keyed by
        ``method``, ``fold`` and ``test_slide``), parameters, grid-search record
        and timings.
    """
    label = label or method_name
    metrics = resolve_metrics(metrics)
    t0 = time.perf_counter()
    params = dict(params)
    selection: dict[str, Any] = {}
    if grid:
        if not fold.inner:
            raise He2stInputError(
                f"method {label!r}: a hyper-parameter grid needs nested folds (split 'nested'); "
                f"fold {fold.name!r} has no inner folds"
            )
        best, selection = select_params(
            method_name, params, grid, cohort, fold.inner, genes, min_spots=min_spots, markers=markers, n_top=n_top
        )
        params.update(best)
    elif search:
        if not fold.inner:
            raise He2stInputError(
                f"method {label!r}: a hyper-parameter search needs nested folds (split 'nested'); "
                f"fold {fold.name!r} has no inner folds"
            )
        candidates = search_candidates(search, seed=int(params.get("seed", 0)))
        best, scored = score_candidates(
            method_name, params, candidates, cohort, fold.inner, genes, min_spots=min_spots, markers=markers, n_top=n_top,
            backend=str(search.get("backend", "local")),
        )
        selection = {"search": json.loads(json.dumps(dict(search))), **scored}
        params.update(best)
    t1 = time.perf_counter()
    mode = fold.val_mode if validation is None else validation
    if mode not in VALIDATION_MODES:
        raise He2stInputError(f"validation must be one of {VALIDATION_MODES}, got {mode!r}")
    train = resolve_slides(cohort, fold.train)
    val = resolve_slides(cohort, fold.val)
    panel, model = fit_on(
        method_name, params, train, val if mode == "select" else [], genes, min_spots=min_spots, markers=markers
    )
    t2 = time.perf_counter()
    check_n_top(n_top, len(panel), where=f"fold {fold.name!r}")
    scoring = {
        "markers": markers, "n_top": n_top, "clustering": clustering, "seed": params.get("seed", 0), "metrics": metrics
    }
    preds, mets, pgs = _score_slides(model, resolve_slides(cohort, fold.test), label, fold.name, **scoring)
    vpreds: list[SlidePrediction] = []
    vmets = vpgs = None
    if mode == "score" and val:
        vpreds, vm, vg = _score_slides(model, val, label, fold.name, **scoring)
        vmets, vpgs = pd.concat(vm, ignore_index=True), pd.concat(vg, ignore_index=True)
    t3 = time.perf_counter()
    return FoldOutcome(
        method=label,
        fold=fold.name,
        panel=panel,
        model=model,
        predictions=preds,
        metrics=pd.concat(mets, ignore_index=True),
        per_gene=pd.concat(pgs, ignore_index=True),
        params=dict(model.params),
        selection=selection,
        timings={"select_s": t1 - t0, "fit_s": t2 - t1, "predict_s": t3 - t2},
        validation_predictions=vpreds,
        validation_metrics=vmets,
        validation_per_gene=vpgs,
    )


def _score_slides(
    model: Any,
    slides: Sequence[Any],
    label: str,
    fold: str,
    *,
    markers: Sequence[str] | None,
    n_top: int,
    clustering: bool,
    seed: int,
    metrics: Sequence[str],
) -> tuple[list[SlidePrediction], list[pd.DataFrame], list[pd.DataFrame]]:
    """Predict and score each slide; metric and per-gene tables keyed by method, fold and slide."""
    from he2st.evaluate.field_metrics import spot_grid

    preds, mets, pgs = [], [], []
    for slide in slides:
        p = predict_slide(model, slide)
        labels = slide.obs["label"].tolist() if clustering and "label" in slide.obs else None
        grid = spot_grid(slide) if any(m in metrics for m in SPATIAL_METRICS) else None
        m, g = score_prediction(
            p, model.genes, markers=markers, n_top=n_top, labels=labels, seed=seed, metrics=metrics, grid=grid
        )
        keys = {"method": label, "fold": fold, "test_slide": p.slide_id}
        for df in (m, g):
            for i, (k, v) in enumerate(keys.items()):
                df.insert(i, k, v)
        preds.append(p)
        mets.append(m)
        pgs.append(g)
    return preds, mets, pgs


def select_params(
    method_name: str,
    params: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    cohort: Any,
    inner: Sequence[Fold],
    genes: Any,
    *,
    min_spots: int | None = None,
    markers: Sequence[str] | None = None,
    n_top: int = N_TOP,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Grid search on inner folds; returns (best params, record of every candidate's score).

    The score of a candidate is the mean PCC(ACG) over the inner folds' test
    slides (NaN slides ignored); ties go to the first candidate in grid order.

    Parameters
    ----------
    method_name
        Registered method name.
    params
        Fixed parameters; each candidate's values override them.
    grid
        ``{param: [values]}``; candidates are every combination, in grid order.
    cohort
        The cohort holding every slide the inner folds name.
    inner
        The inner folds; each chooses its own panel from its own training slides.
    genes, min_spots, markers
        Panel recipe, see :func:`choose_panel`.
    n_top
        Size of the HEG/HVG sets.

    Returns
    -------
    best : dict
        The best candidate's parameter values (the first candidate when no
        score is finite).
    record : dict
        ``grid``, ``candidates`` (each with its ``params`` and
        ``inner_pcc_acg``), ``best`` and ``inner_folds``.

    Raises
    ------
    he2st.errors.He2stInputError
        When a grid entry is not a non-empty list of values.
    """
    keys = list(grid)
    for k in keys:
        if isinstance(grid[k], (str, bytes)) or not isinstance(grid[k], Sequence) or not grid[k]:
            raise He2stInputError(f"grid for {method_name!r}: {k!r} must be a non-empty list of values")
    candidates = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    best, scored = score_candidates(
        method_name, params, candidates, cohort, inner, genes, min_spots=min_spots, markers=markers, n_top=n_top
    )
    record = {"grid": {k: list(v) for k, v in grid.items()}, **scored}
    return best, record


def score_candidates(
    method_name: str,
    params: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    cohort: Any,
    inner: Sequence[Fold],
    genes: Any,
    *,
    min_spots: int | None = None,
    markers: Sequence[str] | None = None,
    n_top: int = N_TOP,
    backend: str = "local",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score parameter candidates on inner folds (training slides of the outer fold only).

    The score of a candidate is the mean PCC(ACG) over the inner folds' test
    slides (NaN slides ignored); ties go to the first candidate.
    ``backend="tune"`` runs one Ray Tune trial per candidate
    (:func:`_tune_scores`); the candidates, their scores and the choice are the
    same as in this process.

    Parameters
    ----------
    method_name
        Registered method name.
    params
        Fixed parameters; each candidate's values override them.
    candidates
        ``[{param: value}, ...]`` in the order ties are broken.
    cohort
        The cohort holding every slide the inner folds name.
    inner
        The inner folds; each chooses its own panel from its own training slides.
    genes, min_spots, markers
        Panel recipe, see :func:`choose_panel`.
    n_top
        Size of the HEG/HVG sets.
    backend
        ``"local"`` (candidates one after the other here) or ``"tune"`` (Ray Tune trials).

    Returns
    -------
    best : dict
        The best candidate (the first when no score is finite).
    record : dict
        ``candidates`` (each with its ``params`` and ``inner_pcc_acg``), ``best`` and ``inner_folds``.
    """
    candidates = [dict(c) for c in candidates]
    if backend not in ("local", "tune"):
        raise He2stInputError(f"search backend must be 'local' or 'tune', got {backend!r}")

    def score(cand: Mapping[str, Any]) -> float:
        vals = []
        for f in inner:
            _, model = fit_on(
                method_name,
                {**params, **cand},
                resolve_slides(cohort, f.train),
                resolve_slides(cohort, f.val if f.val_mode == "select" else ()),
                genes,
                min_spots=min_spots,
                markers=markers,
            )
            for slide in resolve_slides(cohort, f.test):
                p = predict_slide(model, slide)
                m, _ = score_prediction(p, model.genes, n_top=n_top, metrics=["pcc"])
                v = m[(m["metric"] == "pcc") & (m["gene_set"] == "ACG")]["value"].iloc[0]
                vals.append(v)
        arr = np.asarray(vals, dtype=np.float64)
        return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")

    scores = _tune_scores(score, candidates) if backend == "tune" else [score(c) for c in candidates]
    finite = [i for i, s in enumerate(scores) if np.isfinite(s)]
    best = max(finite, key=lambda i: (scores[i], -i)) if finite else 0
    record = {
        "candidates": [{"params": c, "inner_pcc_acg": s} for c, s in zip(candidates, scores)],
        "best": candidates[best],
        "inner_folds": [f.name for f in inner],
    }
    return candidates[best], record


def _tune_scores(score: Any, candidates: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each candidate's inner-CV score from one Ray Tune trial (a grid over the candidates' indices).

    The candidates are drawn before (:func:`search_candidates` or the grid), so
    Tune only schedules the trials, one CPU each, on the running Ray instance
    (or a local one it starts); nothing is written to disk (no checkpoints; the
    trial records go to a temporary folder that is removed).
    """
    import shutil
    import tempfile

    try:
        import ray
        from ray import tune
    except ImportError as exc:  # pragma: no cover - ray is in the test extra
        raise He2stInputError("search backend 'tune' needs Ray Tune: pip install 'he2st[ray]'") from exc

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)

    def trial(config: dict[str, Any]) -> dict[str, float]:
        return {"score": score(candidates[config["index"]])}

    where = tempfile.mkdtemp(prefix="he2st-tune-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1}),
            param_space={"index": tune.grid_search(list(range(len(candidates))))},
            run_config=tune.RunConfig(storage_path=where, name="inner", verbose=0),
        )
        results = tuner.fit()
        out = [float("nan")] * len(candidates)
        for r in results:
            if r.error is not None:
                raise r.error
            out[int(r.config["index"])] = float(r.metrics["score"])
        return out
    finally:
        shutil.rmtree(where, ignore_errors=True)


#: Distributions of a random search space (``{param: {kind: args}}``).
SEARCH_DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")


def check_search(search: Mapping[str, Any], where: str = "search") -> None:
    """Check a random-search specification.

    ``{"method": "random", "n_trials": N, "space": {param: {"uniform": [a, b]} |
    {"loguniform": [a, b]} | {"randint": [a, b]} | {"choice": [v1, v2, ...]}}}``;
    ``seed`` (optional) fixes the sampler (default: the method's ``seed``).

    Parameters
    ----------
    search
        The specification.
    where
        Its place in the configuration, for error messages.

    Raises
    ------
    he2st.errors.He2stInputError
        Naming the key at fault and what was expected.
    """
    if not isinstance(search, Mapping):
        raise He2stInputError(f"{where}: 'search' must be a table, got {search!r}")
    unknown = sorted(set(search) - {"method", "n_trials", "space", "seed", "backend"})
    if unknown:
        raise He2stInputError(
            f"{where}: 'search' has unknown key(s) {unknown}; known: method, n_trials, space, seed, backend")
    if search.get("backend", "local") not in ("local", "tune"):
        raise He2stInputError(f"{where}: search 'backend' must be 'local' or 'tune', got {search.get('backend')!r}")
    if search.get("method", "random") != "random":
        raise He2stInputError(f"{where}: search 'method' must be 'random' (use 'grid' for a grid), got {search.get('method')!r}")
    n = search.get("n_trials")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise He2stInputError(f"{where}: search 'n_trials' must be a positive integer, got {n!r}")
    seed = search.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise He2stInputError(f"{where}: search 'seed' must be an integer, got {seed!r}")
    space = search.get("space")
    if not isinstance(space, Mapping) or not space:
        raise He2stInputError(f"{where}: search 'space' must be a non-empty table {{param: distribution}}, got {space!r}")
    for param, dist in space.items():
        ok = isinstance(dist, Mapping) and len(dist) == 1 and next(iter(dist)) in SEARCH_DISTRIBUTIONS
        if ok:
            (kind, args), = dist.items()
            if kind == "choice":
                ok = isinstance(args, list) and len(args) > 0
            else:
                nums = isinstance(args, list) and len(args) == 2 and all(
                    isinstance(a, (int, float)) and not isinstance(a, bool) and np.isfinite(a) for a in args)
                ok = nums and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)
                ok = ok and (kind != "randint" or all(isinstance(a, int) for a in args))
        if not ok:
            raise He2stInputError(
                f"{where}: search space of {param!r} must be one of {{uniform = [a, b]}}, {{loguniform = [a, b]}} "
                f"(0 < a < b), {{randint = [a, b]}} (integers, b excluded) or {{choice = [values]}}, got {dist!r}"
            )


def search_candidates(search: Mapping[str, Any], seed: int) -> list[dict[str, Any]]:
    """The candidates of a random search: ``n_trials`` draws of a seeded numpy sampler.

    The same specification and seed give the same candidates on any machine and
    under any executor (parameters are drawn in the order the space lists them).

    Parameters
    ----------
    search
        A specification checked by :func:`check_search`.
    seed
        Seed of the sampler when ``search`` names none (the method's ``seed``).

    Returns
    -------
    list of dict
        ``n_trials`` candidates ``{param: value}``.
    """
    check_search(search)
    rng = np.random.default_rng(int(search.get("seed", seed)))
    out = []
    for _ in range(int(search["n_trials"])):
        cand: dict[str, Any] = {}
        for param, dist in search["space"].items():
            (kind, args), = dist.items()
            if kind == "choice":
                cand[param] = args[int(rng.integers(len(args)))]
            elif kind == "randint":
                cand[param] = int(rng.integers(args[0], args[1]))
            elif kind == "uniform":
                cand[param] = float(rng.uniform(args[0], args[1]))
            else:
                cand[param] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
        out.append(cand)
    return out
