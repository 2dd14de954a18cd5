"""Target normalisation: the scale on which models are trained and scored.

Methods (``Normalizer(method)``):

``cpm_log1p`` (default)
    ``log(1 + 1e6 * count / total)`` with the natural log, where ``total`` is
    the spot's count summed over ALL genes of the slide, not only the panel.
    This is the preprocessing of HisToGene, Hist2ST, THItoGene, mclSTExp and
    BLEEP (mclSTExp supplementary notes; Jiang et al. 2024, Table S1).
``log1p``
    ``log(1 + count)`` without library-size normalisation (STimage).
``raw``
    The values as stored; the only method allowed on slides that hold
    pre-normalised values (``uns["he2st"]["counts"] = False``).
``minmax``
    ``cpm_log1p`` values rescaled per gene to ``[0, 1]`` with the minimum and
    maximum of each gene over the TRAINING slides (``fit``). DeepSpaCE
    min-max scales each gene over all spots of its training samples
    (``sklearn.preprocessing.minmax_scale`` per gene on log10 SCTransform
    values); Jiang et al. 2024 benchmark it as "MinMax scaling". We apply it
    to ``cpm_log1p`` values (SCTransform needs R). Test slides are not
    clipped, so values may fall outside ``[0, 1]``.

A spot whose total is zero gets zeros (not NaN) under ``cpm_log1p`` and
``minmax``-before-scaling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from he2st.data.slide import meta, require_counts
from he2st.errors import GenePanelError, He2stInputError

METHODS = ("cpm_log1p", "log1p", "raw", "minmax")

#: Scale factor of counts-per-million.
CPM_SCALE = 1e6


def value_range(values: Iterable[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column float64 minimum and maximum of one array or of several, scanned one at a time.

    Parameters
    ----------
    values
        An ``(n, genes)`` array, or an iterable of them (e.g. one per slide).

    Returns
    -------
    tuple of numpy.ndarray
        Minimum and maximum of every column.
    """
    arrays = [values] if isinstance(values, np.ndarray) else values
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        lo = a.min(axis=0) if lo is None else np.minimum(lo, a.min(axis=0))
        hi = a.max(axis=0) if hi is None else np.maximum(hi, a.max(axis=0))
    if lo is None or hi is None:
        raise He2stInputError("a min-max range needs at least one array of training values")
    return lo, hi


class MinMaxScaler:
    """Per-gene min-max scaling fitted on training values, inverted exactly.

    ``transform(y) = (y - min) / span`` with ``span = max - min`` (1 for a gene
    constant on the training data, so both directions stay exact). Values
    outside the training range are not clipped. ``inverse_transform(transform(y))
    == y`` up to float rounding. The arithmetic runs in float64 and returns
    float32. :class:`Normalizer` (``"minmax"``) and DeepSpaCE's target scaling
    both use it.

    Attributes
    ----------
    min_, span_
        Per-gene float64 minimum and span (None before ``fit``).
    """

    def __init__(self) -> None:
        self.min_: np.ndarray | None = None
        self.span_: np.ndarray | None = None

    @classmethod
    def from_range(cls, lo: np.ndarray, hi: np.ndarray) -> MinMaxScaler:
        """A scaler with the given per-gene minimum and maximum.

        Parameters
        ----------
        lo, hi
            Per-gene minimum and maximum of the training values.

        Returns
        -------
        MinMaxScaler
            The fitted scaler.
        """
        out = cls()
        lo = np.asarray(lo, dtype=np.float64)
        span = np.asarray(hi, dtype=np.float64) - lo
        # A gene constant on the training data has no range; 1 keeps transform and inverse exact.
        out.min_, out.span_ = lo, np.where(span > 0, span, 1.0)
        return out

    def fit(self, values: Iterable[np.ndarray] | np.ndarray) -> MinMaxScaler:
        """Fit on training values: one ``(n, genes)`` array or several (e.g. one per slide).

        Parameters
        ----------
        values
            Training values; arrays are scanned one at a time.

        Returns
        -------
        MinMaxScaler
            ``self``.
        """
        fitted = MinMaxScaler.from_range(*value_range(values))
        self.min_, self.span_ = fitted.min_, fitted.span_
        return self

    def _check(self) -> tuple[np.ndarray, np.ndarray]:
        if self.min_ is None or self.span_ is None:
            raise He2stInputError("MinMaxScaler is not fitted")
        return self.min_, self.span_

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scaled float32 values ``(values - min) / span``."""
        lo, span = self._check()
        return ((np.asarray(values, dtype=np.float64) - lo) / span).astype(np.float32)

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        """Values back on the training scale, float32 ``values * span + min``."""
        lo, span = self._check()
        return (np.asarray(values, dtype=np.float64) * span + lo).astype(np.float32)


class Normalizer:
    """Maps a slide's raw counts to model targets on a gene panel.

    Parameters
    ----------
    method
        One of :data:`METHODS`; see the module docstring.

    Attributes
    ----------
    genes_
        Panel genes the normalizer was fitted for (None before ``fit``).
    min_, max_
        Per-gene minimum and maximum of the training ``cpm_log1p`` values
        (``minmax`` only).

    Examples
    --------
    >>> norm = Normalizer("minmax").fit(cohort[:3], panel.genes)
    >>> y = norm.transform(cohort[3], panel.genes)   # (n_spots, n_genes) float32
    >>> np.allclose(norm.inverse_transform(y), Normalizer().transform(cohort[3], panel.genes))
    True
    """

    def __init__(self, method: str = "cpm_log1p") -> None:
        if method not in METHODS:
            raise He2stInputError(f"unknown normalisation {method!r}; choose one of {METHODS}")
        self.method = method
        self.genes_: list[str] | None = None
        self.min_: np.ndarray | None = None
        self.max_: np.ndarray | None = None

    def __repr__(self) -> str:
        fitted = f", {len(self.genes_)} genes" if self.genes_ is not None else ""
        return f"Normalizer({self.method!r}{fitted})"

    @property
    def needs_counts(self) -> bool:
        """Whether the method needs raw counts (all but ``raw``)."""
        return self.method != "raw"

    # -- fitting ----------------------------------------------------------
    def fit(self, slides: Sequence[Any], genes: Sequence[str], fill_missing: bool = False) -> Normalizer:
        """Fit on the training slides (only ``minmax`` learns anything).

        Parameters
        ----------
        slides
            Training slides; nothing else may be passed here.
        genes
            Panel genes (a list or anything with ``.genes``).
        fill_missing
            Treat panel genes absent from a slide as zero counts instead of failing.

        Returns
        -------
        Normalizer
            ``self``, fitted.
        """
        slides = list(slides)
        if not slides:
            raise He2stInputError("Normalizer.fit needs at least one training slide")
        genes = _genes(genes)
        if self.needs_counts:
            for s in slides:
                require_counts(s, f"{self.method} normalisation")
        self.genes_ = genes
        if self.method == "minmax":
            self.min_, self.max_ = value_range(_cpm_log1p(s, genes, fill_missing) for s in slides)
        else:
            # Check the panel against every training slide now, not at the first transform.
            for s in slides:
                _column_index(s, genes, fill_missing)
        return self

    # -- transforms -------------------------------------------------------
    def transform(self, slide: Any, genes: Sequence[str] | None = None, fill_missing: bool = False) -> np.ndarray:
        """Normalised values of ``slide`` on ``genes``: dense float32 ``(n_spots, n_genes)``.

        Parameters
        ----------
        slide
            A slide AnnData.
        genes
            Panel genes; defaults to the fitted genes. For ``minmax`` they must be
            among the fitted genes (their own min/max are used).
        fill_missing
            Panel genes absent from the slide are treated as zero counts
            (zero values for ``raw``) instead of raising.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_spots, n_genes)`` on the normaliser's scale.

        Raises
        ------
        GenePanelError
            A panel gene is missing from the slide (and ``fill_missing`` is False),
            or ``minmax`` is asked for a gene it was not fitted on.
        NotCountsError
            Any method but ``raw`` on a slide without raw counts.
        """
        genes = self._resolve_genes(genes)
        if self.method == "raw":
            return _raw(slide, genes, fill_missing)
        require_counts(slide, f"{self.method} normalisation")
        if self.method == "log1p":
            return np.log1p(_raw(slide, genes, fill_missing))
        values = _cpm_log1p(slide, genes, fill_missing)
        if self.method == "cpm_log1p":
            return values
        return self._scaling(genes).transform(values)

    def inverse_transform(self, values: np.ndarray, genes: Sequence[str] | None = None) -> np.ndarray:
        """Undo the per-gene scaling of ``minmax`` (back to the ``cpm_log1p`` scale).

        The log methods have no learned scaling; for them this returns a
        float32 copy of ``values`` unchanged (their scale already is the base
        scale).

        Parameters
        ----------
        values
            Values on this normaliser's scale, genes in the last axis.
        genes
            The genes of the columns of ``values`` (default: the fitted genes);
            for ``minmax`` they must be among the fitted genes.

        Returns
        -------
        numpy.ndarray
            float32 values of the same shape on the ``cpm_log1p`` scale (for
            ``minmax``), or an unchanged float32 copy (other methods).

        Raises
        ------
        He2stInputError
            ``minmax``: the number of columns differs from the number of genes,
            or the normaliser is not fitted.
        GenePanelError
            ``minmax`` is asked for a gene it was not fitted on.
        """
        values = np.asarray(values)
        if self.method != "minmax":
            return values.astype(np.float32, copy=True)
        genes = self._resolve_genes(genes)
        if values.shape[-1] != len(genes):
            raise He2stInputError(f"inverse_transform: values have {values.shape[-1]} columns for {len(genes)} genes")
        return self._scaling(genes).inverse_transform(values)

    def _resolve_genes(self, genes: Sequence[str] | None) -> list[str]:
        if genes is not None:
            return _genes(genes)
        if self.genes_ is None:
            raise He2stInputError(f"Normalizer({self.method!r}): pass genes or call fit() first")
        return list(self.genes_)

    def _scaling(self, genes: list[str]) -> MinMaxScaler:
        if self.min_ is None or self.max_ is None or self.genes_ is None:
            raise He2stInputError("Normalizer('minmax') is not fitted: call fit(train_slides, genes) first")
        pos = {g: i for i, g in enumerate(self.genes_)}
        unknown = [g for g in genes if g not in pos]
        if unknown:
            raise GenePanelError(f"minmax normaliser was not fitted on genes {unknown[:10]}")
        idx = np.array([pos[g] for g in genes], dtype=np.int64)
        return MinMaxScaler.from_range(self.min_[idx], self.max_[idx])

    # -- persistence ------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state (method, genes and, for ``minmax``, min/max)."""
        state: dict[str, Any] = {"method": self.method, "genes": self.genes_}
        if self.method == "minmax" and self.min_ is not None and self.max_ is not None:
            # float64 -> JSON float is exact (repr round-trips), so a reloaded scaler is identical.
            state["min"] = [float(v) for v in self.min_]
            state["max"] = [float(v) for v in self.max_]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalizer:
        """Rebuild a normalizer from :meth:`get_state`'s output."""
        obj = cls(state["method"])
        genes = state.get("genes")
        obj.genes_ = None if genes is None else [str(g) for g in genes]
        if "min" in state and "max" in state:
            obj.min_ = np.asarray(state["min"], dtype=np.float64)
            obj.max_ = np.asarray(state["max"], dtype=np.float64)
            if obj.genes_ is None or len(obj.min_) != len(obj.genes_) or len(obj.max_) != len(obj.genes_):
                raise He2stInputError("normalizer state: min/max do not match the number of genes")
        return obj


# -- plain functions -----------------------------------------------------------


def normalize(
    slide: Any,
    method: str | Normalizer = "cpm_log1p",
    genes: Sequence[str] | None = None,
    fill_missing: bool = False,
) -> Any:
    """A new AnnData with normalised values on a gene panel (scanpy style).

    Parameters
    ----------
    slide
        A slide AnnData (not modified).
    method
        A method name or a fitted :class:`Normalizer`. The name ``"minmax"``
        fits the scaling on this slide alone, which is fine for looking at one
        slide; models must use a normalizer fitted on their training slides.
    genes
        Panel genes; default all genes of the slide (or the normalizer's genes).
    fill_missing
        See :meth:`Normalizer.transform`.

    Returns
    -------
    anndata.AnnData
        Dense float32 ``.X``; ``obs``, ``obsm`` and ``uns`` copied; ``uns["he2st"]``
        gets ``counts=False`` and ``normalization=<method>``.
    """
    import anndata as ad
    import pandas as pd

    if isinstance(method, Normalizer):
        norm = method
        genes = _genes(genes) if genes is not None else norm._resolve_genes(None)
    else:
        norm = Normalizer(method)
        genes = _genes(genes) if genes is not None else [str(g) for g in slide.var_names]
        if norm.method == "minmax":
            norm.fit([slide], genes, fill_missing=fill_missing)
    X = norm.transform(slide, genes, fill_missing=fill_missing)
    out = ad.AnnData(X=X, obs=slide.obs.copy(), var=pd.DataFrame(index=pd.Index(genes)))
    for k, v in slide.obsm.items():
        out.obsm[k] = v.copy()
    out.uns.update({k: _copy(v) for k, v in slide.uns.items()})
    if "he2st" in out.uns:
        out.uns["he2st"]["counts"] = False
        out.uns["he2st"]["normalization"] = norm.method
    return out


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def _genes(genes: Any) -> list[str]:
    names = [str(g) for g in getattr(genes, "genes", genes)]
    if not names:
        raise GenePanelError("the gene panel is empty")
    return names


def _column_index(slide: Any, genes: list[str], fill_missing: bool) -> np.ndarray:
    """Column of each panel gene in ``slide`` (-1 where missing and ``fill_missing``)."""
    idx = slide.var_names.get_indexer(genes)
    if (idx < 0).any() and not fill_missing:
        missing = [g for g, i in zip(genes, idx) if i < 0]
        sid = meta(slide).slide_id if "he2st" in slide.uns else "<AnnData>"
        raise GenePanelError(
            f"slide {sid!r}: {len(missing)} of {len(genes)} panel genes are missing: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; pass fill_missing=True to treat them as zero counts"
        )
    return idx


def _raw(slide: Any, genes: list[str], fill_missing: bool) -> np.ndarray:
    """Stored values on the panel, dense float32, zeros for missing genes."""
    idx = _column_index(slide, genes, fill_missing)
    out = np.zeros((slide.n_obs, len(genes)), dtype=np.float32)
    present = idx >= 0
    if present.any():
        X = slide.X[:, idx[present]]
        out[:, present] = X.toarray() if sp.issparse(X) else np.asarray(X)
    return out


def _cpm_log1p(slide: Any, genes: list[str], fill_missing: bool) -> np.ndarray:
    """``log1p(1e6 * count / total)`` with totals over all genes; zero-total spots give 0."""
    counts = _raw(slide, genes, fill_missing).astype(np.float64)
    totals = np.asarray(slide.X.sum(axis=1), dtype=np.float64).reshape(-1, 1)
    cpm = np.divide(counts * CPM_SCALE, totals, out=np.zeros_like(counts), where=totals > 0)
    return np.log1p(cpm).astype(np.float32)


__all__ = ["CPM_SCALE", "METHODS", "MinMaxScaler", "Normalizer", "normalize", "value_range"]
