"""Stain normalisation of H&E patches: Macenko, Reinhard and Vahadane.

A :class:`StainNormalizer` is fitted on reference (training) images and maps
other images onto the reference's stain appearance::

    norm = StainNormalizer("macenko").fit(train_patches)
    test_patches = norm.transform(test_patches)
    state = norm.get_state()            # JSON-safe; StainNormalizer.from_state(state)

- ``"macenko"``: Macenko et al., ISBI 2009 -- stain vectors from the extreme
  angles of the optical densities (OD) in the plane of their two main
  eigenvectors; torchstain's numpy implementation.
- ``"reinhard"``: Reinhard et al., IEEE CG&A 2001 -- match per-channel mean and
  standard deviation in LAB; torchstain's numpy implementation.
- ``"vahadane"``: Vahadane et al., IEEE TMI 2016 (structure-preserving colour
  normalisation; used by STimage) -- stain vectors by sparse non-negative
  dictionary learning of tissue ODs (``lambda = 0.1``), concentrations by
  non-negative lasso (``lambda = 0.01``), implemented here (torchstain lacks
  it): alternating exact two-stain lasso codes and projected non-negative
  dictionary updates (checked against scikit-learn's solvers in the tests).

Source stains are estimated once for all images of a :meth:`~StainNormalizer.transform`
call (``source="batch"``, the default: pass the patches of one slide, or pin a
slide-level estimate with ``transform(batch, source=norm.estimate_source(slide_patches))``
when the slide is processed in batches) or per image (``source="image"``, the
classic tile-level use). Per slide is the default
because spot patches are small: on real her2st C2 tissue re-stained
synthetically (8 patches of 128 px), the per-slide estimate brought the mean
absolute error to the original from 14.6 to 3.4 (Macenko) and 2.4 (Vahadane)
grey levels, while per-patch estimates left it at 12.9 and 11.7 -- each
patch's own 99th-percentile rescaling distorts patches with few nuclei. Images with too little
tissue to estimate stains from (fewer than ``min_tissue_pixels`` stained pixels,
see :func:`tissue_pixels`: blank glass, padding) are returned
unchanged and counted in ``n_unchanged_``; there is nothing to normalise in them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from he2st.errors import He2stInputError

METHODS = ("macenko", "reinhard", "vahadane")

#: Defaults per method (Macenko: Io = 240, alpha = 1 percentile, beta = 0.15 OD as in the
#: paper's reference code; Vahadane: lambda 0.1 for the dictionary and 0.01 for the concentrations).
DEFAULTS: dict[str, dict[str, Any]] = {
    "macenko": {"Io": 240, "alpha": 1.0, "beta": 0.15},
    "reinhard": {"beta": 0.15},
    "vahadane": {"Io": 255, "beta": 0.15, "lambda_dict": 0.1, "lambda_conc": 0.01, "max_pixels": 20000},
}
_COMMON = {"source": "batch", "min_tissue_pixels": 100, "max_fit_pixels": 2_000_000, "seed": 0}


def _as_batch(images: Any) -> tuple[np.ndarray, bool]:
    """``(n, h, w, 3)`` uint8 and whether a single image was passed."""
    if isinstance(images, (list, tuple)):
        arrs = [np.asarray(a) for a in images]
        if not arrs:
            raise He2stInputError("no images given (empty list)")
        if len({a.shape for a in arrs}) == 1:
            return np.stack(arrs), False
        raise He2stInputError(f"images differ in shape {sorted({a.shape for a in arrs})[:3]}; pass one size")
    a = np.asarray(images)
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise He2stInputError(f"expected uint8 RGB images (n, h, w, 3) or (h, w, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        raise He2stInputError(f"expected uint8 RGB images, got dtype {a.dtype} (convert with .astype(np.uint8))")
    if a.shape[0] == 0:
        raise He2stInputError("no images given (empty array)")
    return a, single


def optical_density(rgb: np.ndarray, Io: float = 255.0) -> np.ndarray:
    """Optical density ``-log((I + 1) / Io)`` of uint8 RGB values, float64 (..., 3).

    Parameters
    ----------
    rgb
        uint8 RGB values, any leading shape.
    Io
        Intensity of the illuminating light (background).

    Returns
    -------
    numpy.ndarray
        Optical densities, float64, same shape as ``rgb``.
    """
    return -np.log((rgb.astype(np.float64) + 1.0) / Io)


def tissue_pixels(rgb: np.ndarray, beta: float = 0.15, Io: float = 240.0, rule: str = "all") -> np.ndarray:
    """Boolean mask of stained pixels.

    ``rule="all"``: OD at least ``beta`` in every channel (Macenko's criterion, which
    also drops pale eosin); ``rule="mean"``: mean OD over the channels at least ``beta``
    (keeps pale eosin, whose red OD is small; used for Reinhard and Vahadane).

    Parameters
    ----------
    rgb
        uint8 RGB values, any leading shape.
    beta
        Optical-density threshold.
    Io
        Background intensity used for the optical density.
    rule
        ``"all"`` or ``"mean"``.

    Returns
    -------
    numpy.ndarray
        Boolean, the shape of ``rgb`` without its last axis.
    """
    od = optical_density(rgb, Io)
    return (od >= beta).all(axis=-1) if rule == "all" else od.mean(axis=-1) >= beta


# ----------------------------------------------------------------------------
# Vahadane pieces (tested against scikit-learn in tests/test_stain.py)
# ----------------------------------------------------------------------------


def nonneg_lasso_2(X: np.ndarray, W: np.ndarray, lam: float) -> np.ndarray:
    """Exact solution of ``min_c 0.5 ||x - c W||^2 + lam * sum(c)`` s.t. ``c >= 0``, per row of ``X``.

    ``W`` is ``(2, d)`` (two stains); ``X`` is ``(n, d)``. The problem is a
    2-variable convex QP: the optimum has both, one or no coefficient active,
    so the three candidates are solved in closed form and the feasible one
    with the lowest objective is kept. Equivalent to scikit-learn's
    ``sparse_encode(X, W, algorithm="lasso_cd", alpha=lam, positive=True)``,
    but vectorised (thousands of times faster for a patch's pixels).

    Parameters
    ----------
    X
        Optical densities, ``(n, d)``.
    W
        The two stain vectors, ``(2, d)``.
    lam
        L1 penalty.

    Returns
    -------
    numpy.ndarray
        Non-negative stain concentrations ``(n, 2)``.
    """
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    G = W @ W.T  # (2, 2)
    b = X @ W.T - lam  # (n, 2): gradient terms
    n = X.shape[0]
    cands = []
    det = G[0, 0] * G[1, 1] - G[0, 1] * G[1, 0]
    if abs(det) > 1e-12:
        inv = np.array([[G[1, 1], -G[0, 1]], [-G[1, 0], G[0, 0]]]) / det
        both = b @ inv.T
        cands.append(np.where((both >= 0).all(axis=1, keepdims=True), both, np.nan))
    for k in (0, 1):
        c = np.zeros((n, 2))
        c[:, k] = np.maximum(b[:, k], 0.0) / max(G[k, k], 1e-12)
        cands.append(c)
    cands.append(np.zeros((n, 2)))

    def objective(c: np.ndarray) -> np.ndarray:
        r = X - c @ W
        return 0.5 * (r * r).sum(axis=1) + lam * c.sum(axis=1)

    best = cands[-1]
    best_obj = objective(best)
    for c in cands[:-1]:
        ok = ~np.isnan(c).any(axis=1)
        obj = np.where(ok, objective(np.nan_to_num(c)), np.inf)
        better = obj < best_obj
        best = np.where(better[:, None], np.nan_to_num(c), best)
        best_obj = np.minimum(best_obj, obj)
    return best


#: Ruifrok & Johnston's haematoxylin and eosin OD vectors: the starting dictionary.
RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])


def learn_stain_matrix(od: np.ndarray, lam: float = 0.1, n_iter: int = 200, tol: float = 1e-7) -> np.ndarray:
    """Two non-negative unit stain vectors (rows; haematoxylin first) by sparse NMF of optical densities.

    Vahadane et al.'s dictionary learning: minimise
    ``0.5 ||OD - C W||_F^2 + lam ||C||_1`` over ``C >= 0`` and ``W >= 0`` with unit-norm
    rows, by alternating the exact code step (:func:`nonneg_lasso_2`) with a
    projected block-coordinate dictionary step (the update of scikit-learn's
    ``dict_learning``, restricted to non-negative atoms), starting from
    Ruifrok's H&E vectors. Haematoxylin is the vector with the larger red-channel
    OD (it absorbs red; eosin barely does).

    Parameters
    ----------
    od
        Optical densities of tissue pixels, ``(n, 3)``.
    lam
        L1 penalty on the concentrations.
    n_iter
        Maximum number of alternating iterations.
    tol
        Stop when the dictionary moves less than this.

    Returns
    -------
    numpy.ndarray
        ``(2, 3)``, unit rows, haematoxylin first.
    """
    X = np.asarray(od, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 3 or X.shape[0] < 2:
        raise He2stInputError(f"need at least 2 optical-density rows (m, 3) to learn stain vectors, got {X.shape}")
    W = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
    for _ in range(n_iter):
        W_old = W.copy()
        C = nonneg_lasso_2(X, W, lam)
        A, B = C.T @ C, C.T @ X  # sufficient statistics: the update needs only these
        for k in range(2):
            if A[k, k] < 1e-12:
                continue  # unused atom: keep it
            j = 1 - k
            w = np.maximum((B[k] - A[k, j] * W[j]) / A[k, k], 0.0)
            norm = float(np.linalg.norm(w))
            if norm > 1e-12:
                W[k] = w / norm
        if np.abs(W - W_old).max() < tol:
            break
    if W[0, 0] < W[1, 0]:
        W = W[::-1]
    return np.ascontiguousarray(W)


# ----------------------------------------------------------------------------
# The normaliser
# ----------------------------------------------------------------------------


class StainNormalizer:
    """Map H&E images onto the stain appearance of a reference set.

    Parameters
    ----------
    method
        ``"macenko"`` (default), ``"reinhard"`` or ``"vahadane"``.
    source
        ``"batch"`` (default): estimate the source stains once per :meth:`transform`
        call from all its images (pass one slide at a time); ``"image"``: per image.
    min_tissue_pixels
        Images with fewer tissue pixels are returned unchanged.
    max_fit_pixels
        Pixels sampled (seeded) from the reference set for fitting.
    seed
        Seed of every random choice (pixel sampling, dictionary learning).
    **params
        Method parameters; see :data:`DEFAULTS`.

    Attributes
    ----------
    n_unchanged_
        Images returned unchanged by the last :meth:`transform` (too little tissue).
    """

    def __init__(self, method: str = "macenko", **params: Any) -> None:
        method = str(method).lower()
        if method not in METHODS:
            raise He2stInputError(f"unknown stain normalisation {method!r}; choose one of {', '.join(METHODS)}")
        allowed = {**_COMMON, **DEFAULTS[method]}
        unknown = set(params) - set(allowed)
        if unknown:
            raise He2stInputError(f"{method}: unknown parameters {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.method = method
        self.params: dict[str, Any] = {**allowed, **params}
        if self.params["source"] not in ("image", "batch"):
            raise He2stInputError(f"source must be 'image' or 'batch', got {self.params['source']!r}")
        self.fitted_: dict[str, np.ndarray] | None = None
        self.fixed_source_: dict[str, np.ndarray] | None = None  # set by with_source()
        self.n_unchanged_ = 0

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r}, fitted={self.fitted_ is not None})"

    # -- fitting -------------------------------------------------------------------
    def _tissue(self, px: np.ndarray) -> np.ndarray:
        rule = "all" if self.method == "macenko" else "mean"
        Io = self.params.get("Io", 240)
        return tissue_pixels(px, self.params["beta"], Io, rule)

    def _sample_pixels(self, imgs: np.ndarray, tissue_only: bool) -> np.ndarray:
        px = imgs.reshape(-1, 3)
        if tissue_only:
            px = px[self._tissue(px)]
        if px.shape[0] < self.params["min_tissue_pixels"]:
            raise He2stInputError(
                f"{self.method}: the reference images hold only {px.shape[0]} tissue pixels "
                f"(need {self.params['min_tissue_pixels']}); fit on patches that contain tissue"
            )
        cap = int(self.params["max_fit_pixels"])
        if px.shape[0] > cap:
            rng = np.random.default_rng(self.params["seed"])
            px = px[rng.choice(px.shape[0], cap, replace=False)]
        return px

    def fit(self, images: Any) -> StainNormalizer:
        """Learn the reference stain appearance from ``images`` (uint8 ``(n, h, w, 3)`` or one image)."""
        imgs, _ = _as_batch(images)
        p = self.params
        if self.method == "macenko":
            from torchstain.base.normalizers import MacenkoNormalizer

            px = self._sample_pixels(imgs, tissue_only=False)
            tn = MacenkoNormalizer(backend="numpy")
            try:
                tn.fit(px[:, None, :], Io=p["Io"], alpha=p["alpha"], beta=p["beta"])
            except (ValueError, IndexError, np.linalg.LinAlgError) as exc:
                raise He2stInputError(f"macenko: cannot estimate stain vectors from the reference: {exc}") from exc
            self.fitted_ = {"stain_matrix": np.asarray(tn.HERef, float), "max_conc": np.asarray(tn.maxCRef, float)}
        elif self.method == "reinhard":
            from torchstain.base.normalizers import ReinhardNormalizer

            px = self._sample_pixels(imgs, tissue_only=False)
            tn = ReinhardNormalizer(backend="numpy")
            tn.fit(px[:, None, :])
            self.fitted_ = {"means": np.asarray(tn.target_means, float), "stds": np.asarray(tn.target_stds, float)}
        else:
            px = self._sample_pixels(imgs, tissue_only=True)
            W, maxc = self._vahadane_estimate(px)
            self.fitted_ = {"stain_matrix": W, "max_conc": maxc}
        return self

    def _vahadane_estimate(self, px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stain matrix (from ≤ max_pixels tissue pixels) and 99th-percentile concentrations."""
        p = self.params
        od = optical_density(px, p["Io"])
        sample = od
        if od.shape[0] > p["max_pixels"]:
            rng = np.random.default_rng(p["seed"])
            sample = od[rng.choice(od.shape[0], p["max_pixels"], replace=False)]
        W = learn_stain_matrix(sample, p["lambda_dict"])
        C = nonneg_lasso_2(od, W, p["lambda_conc"])
        return W, np.percentile(C, 99, axis=0)

    # -- transforming --------------------------------------------------------------
    def _require_fitted(self) -> dict[str, np.ndarray]:
        if self.fitted_ is None:
            raise He2stInputError(
                f"StainNormalizer({self.method!r}) is not fitted: call .fit(reference_images) first "
                "(or load a fitted state with StainNormalizer.from_state)"
            )
        return self.fitted_

    def estimate_source(self, images: Any) -> dict[str, np.ndarray] | None:
        """Stain parameters of a set of images (e.g. all patches of one slide), for :meth:`transform`.

        Lets a caller that normalises a slide in several batches use one
        estimate for all of them: ``src = norm.estimate_source(patches.images)``,
        then ``norm.transform(batch, source=src)`` per batch. None when the images
        hold too little tissue.
        """
        imgs, _ = _as_batch(images)
        keep = np.array([self._tissue(im).sum() >= self.params["min_tissue_pixels"] for im in imgs])
        if not keep.any():
            return None
        return self._estimate_source(self._sample_source(imgs, keep))

    def with_source(self, images: Any) -> StainNormalizer:
        """A copy whose :meth:`transform` uses the stains of ``images`` (e.g. a whole slide) for every batch.

        For callers that normalise one slide in batches: outputs then do not
        depend on how the slide is cut into batches. Same :meth:`cache_key`.
        """
        import copy

        clone = copy.copy(self)
        clone.fixed_source_ = self.estimate_source(images)
        return clone

    def transform(self, images: Any, source: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Normalise ``images`` (uint8 ``(n, h, w, 3)`` or one image) to the reference; returns uint8.

        ``source``: stain parameters from :meth:`estimate_source` (e.g. of the
        whole slide) to use instead of estimating them from ``images``.

        Parameters
        ----------
        images
            uint8 RGB, ``(n, h, w, 3)`` or ``(h, w, 3)``.
        source
            Stain parameters of the source, or None to estimate them from ``images``.

        Returns
        -------
        numpy.ndarray
            uint8 images of the same shape, normalised to the reference.
        """
        f = self._require_fitted()
        imgs, single = _as_batch(images)
        out = imgs.copy()
        has_tissue = np.array([self._tissue(im).sum() >= self.params["min_tissue_pixels"] for im in imgs])
        done = np.zeros(len(imgs), dtype=bool)
        if source is not None or self.fixed_source_ is not None or self.params["source"] == "batch":
            idx = np.flatnonzero(has_tissue)
            src = source if source is not None else self.fixed_source_
            if src is None and idx.size:
                src = self._estimate_source(self._sample_source(imgs, has_tissue))
            if src is not None:
                for start in range(0, idx.size, 32):  # bounded temporaries for big slides
                    chunk = idx[start : start + 32]
                    out[chunk] = self._apply(imgs[chunk], src, f)
                done[idx] = True
        else:
            for i in np.flatnonzero(has_tissue):
                src = self._estimate_source(imgs[i].reshape(-1, 3))
                if src is not None:
                    out[i] = self._apply(imgs[i][None], src, f)[0]
                    done[i] = True
        self.n_unchanged_ = int((~done).sum())
        return out[0] if single else out

    def _sample_source(self, imgs: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Pixels (≤ ``max_fit_pixels``, seeded) of the images ``keep`` selects, without copying them all."""
        n, h, w, _ = imgs.shape
        kept = np.flatnonzero(keep) if keep is not None else np.arange(n)
        per = h * w
        total = kept.size * per
        cap = int(self.params["max_fit_pixels"])
        flat = imgs.reshape(n, per, 3)
        if total <= cap:
            return flat[kept].reshape(-1, 3)
        rng = np.random.default_rng(self.params["seed"])
        ids = np.sort(rng.choice(total, cap, replace=False))
        return flat[kept[ids // per], ids % per]

    def _estimate_source(self, px: np.ndarray) -> dict[str, np.ndarray] | None:
        """The source's stain parameters from pixels ``(m, 3)``; None when they cannot be estimated."""
        p = self.params
        if self.method == "macenko":
            from torchstain.base.normalizers import MacenkoNormalizer

            tn = MacenkoNormalizer(backend="numpy")
            try:
                with np.errstate(all="ignore"):
                    tn.fit(px[:, None, :], Io=p["Io"], alpha=p["alpha"], beta=p["beta"])
            except (ValueError, IndexError, np.linalg.LinAlgError):
                return None  # degenerate OD cloud (e.g. one flat colour): nothing to separate
            if not (np.isfinite(tn.HERef).all() and np.isfinite(tn.maxCRef).all() and (tn.maxCRef > 0).all()):
                return None
            return {"stain_matrix": np.asarray(tn.HERef, float), "max_conc": np.asarray(tn.maxCRef, float)}
        if self.method == "reinhard":
            from torchstain.base.normalizers import ReinhardNormalizer

            tn = ReinhardNormalizer(backend="numpy")
            tn.fit(px[:, None, :])
            stds = np.asarray(tn.target_stds, float)
            if not (stds > 1e-6).all():
                return None
            return {"means": np.asarray(tn.target_means, float), "stds": stds}
        tissue = px[self._tissue(px)]
        if tissue.shape[0] < max(2, p["min_tissue_pixels"]):
            return None
        W, maxc = self._vahadane_estimate(tissue)
        return {"stain_matrix": W, "max_conc": maxc}

    def _apply(self, imgs: np.ndarray, src: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
        """Map images stained like ``src`` onto ``ref`` (the fitted reference)."""
        p = self.params
        shape = imgs.shape
        px = imgs.reshape(-1, 3)
        if self.method == "macenko":
            # Macenko et al.: concentrations by least squares on the source stains, their 99th
            # percentiles matched to the reference's, recomposed with the reference stains
            # (the same steps as torchstain's normalize, applied with a separate source estimate).
            od = optical_density(px, p["Io"])
            conc = np.linalg.lstsq(src["stain_matrix"], od.T, rcond=None)[0]
            conc /= (src["max_conc"] / ref["max_conc"])[:, None]
            rgb = p["Io"] * np.exp(-ref["stain_matrix"] @ conc)
            return np.clip(rgb.T, 0, 255).astype(np.uint8).reshape(shape)
        if self.method == "reinhard":
            from torchstain.numpy.utils.lab2rgb import lab2rgb
            from torchstain.numpy.utils.rgb2lab import rgb2lab
            from torchstain.numpy.utils.split import lab_merge, lab_split

            labs = lab_split(rgb2lab(px[:, None, :].astype(np.float32) / 255))
            res = [
                (x - mu) / sd * sd_t + mu_t
                for x, mu, sd, mu_t, sd_t in zip(labs, src["means"], src["stds"], ref["means"], ref["stds"], strict=True)
            ]
            rgb = lab2rgb(lab_merge(*res))
            return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8).reshape(shape)
        od = optical_density(px, p["Io"])
        conc = nonneg_lasso_2(od, src["stain_matrix"], p["lambda_conc"])
        conc *= ref["max_conc"] / np.maximum(src["max_conc"], 1e-6)
        rgb = p["Io"] * np.exp(-(conc @ ref["stain_matrix"])) - 1.0
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(shape)

    def fit_transform(self, images: Any) -> np.ndarray:
        """Fit on ``images`` and normalise them."""
        return self.fit(images).transform(images)

    # -- persistence ---------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-safe state: method, parameters and fitted reference values."""
        f = self._require_fitted()
        return {
            "method": self.method,
            "params": dict(self.params),
            "fitted": {k: np.asarray(v, float).tolist() for k, v in f.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StainNormalizer:
        """Rebuild a fitted normaliser from :meth:`get_state`'s output."""
        try:
            obj = cls(state["method"], **state.get("params", {}))
            obj.fitted_ = {k: np.asarray(v, dtype=np.float64) for k, v in state["fitted"].items()}
        except (KeyError, TypeError) as exc:
            raise He2stInputError(f"not a StainNormalizer state (missing {exc})") from exc
        return obj

    def cache_key(self) -> str:
        """Short stable id of method + parameters + reference (for feature caches)."""
        state = self.get_state()
        fitted = {k: np.round(np.asarray(v), 6).tolist() for k, v in state["fitted"].items()}
        text = json.dumps({"method": self.method, "params": state["params"], "fitted": fitted}, sort_keys=True)
        return f"{self.method}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
