"""Target normalisation: the scale on which models are trained and scored.

Methods (``Normalizer(method)``):

``cpm_log1p`` (default)
    ``ln(1 + 1e6 * count / total)``, where ``total`` is the spot's count
    summed over ALL genes of the slide, not only the panel. The common
    evaluation scale of the benchmark protocol (and mclSTExp's and BLEEP's
    training target). It is NOT the training target of HisToGene, Hist2ST or
    THItoGene: see ``hist2st_lognorm``.
``hist2st_lognorm``
    ``log10(1 + 1e4 * count / panel_total)``, where ``panel_total`` is the
    spot's count summed over the PANEL genes only: scprep's
    ``library_size_normalize`` (rescale 1e4) on the panel columns followed by
    ``scprep.transform.log`` (pseudocount 1, base 10), the training target of
    HisToGene (``maxpmx/HisToGene`` dataset.py:267), Hist2ST
    (``biomed-AI/Hist2ST`` dataset.py:84) and THItoGene (which reuses
    Hist2ST's dataset). The two are NOT the same scale: base 10 divides the
    values by ``ln 10 = 2.3`` and the 100x smaller scale factor compresses low
    counts further, so the per-gene variance is many times smaller than under
    ``cpm_log1p`` (about 22x on her2st), which changes e.g. the balance of
    Hist2ST's MSE, ZINB and distillation terms.
``stnet_norm``
    ``ln((1 + count) / (n_genes + total))`` with ``n_genes`` the number of
    genes of the slide and ``total`` its all-gene count: ST-Net's ``--norm``
    with the default ``--gene_transform log`` (``bryanhe/ST-Net``
    stnet/datasets/spatial.py:159-178).
``log1p``
    ``ln(1 + count)`` without library-size normalisation (STimage).
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

A spot whose total (or panel total) is zero gets zeros (not NaN).

Training scale versus evaluation scale
--------------------------------------
A method may train on its paper's scale (``train_normalization``) while the
protocol scores every method on one common scale (``normalization``, default
``cpm_log1p``). Predictions are carried across with :meth:`Normalizer.convert`,
which goes through the share of the spot's all-gene library,
``f = count / total``, using ONLY constants fitted on the training slides:

- ``cpm_log1p`` and ``minmax`` <-> ``f``: exact;
- ``hist2st_lognorm`` -> ``f = (10**y - 1) / 1e4 * panel_fraction_``, where
  ``panel_fraction_`` is the geometric mean, over the training spots, of the
  panel's share of the spot's library (``panel_total / total``). The exact
  map would need the TEST spot's panel share, i.e. its observed counts; the
  training constant is the leak-free choice. Per gene it is a fixed monotone
  map, so rankings of spots are kept; per-gene PCC changes only through the
  map's curvature, and MSE is scored on the common scale as for every method.
  The spot-to-spot variation of the panel share, which a model trained on
  panel-relative targets never sees, is part of that method's error.
- ``stnet_norm`` -> ``f = (e**y * stnet_denominator_ - 1) / library_`` with
  ``stnet_denominator_`` the geometric mean, over the training spots, of
  ST-Net's denominator ``n_genes + total`` and ``library_`` the geometric-mean
  library (the exact map needs the test spot's total). The geometric mean of
  the denominator, not ``n_genes + library_``, is what makes the map invert a
  model's prediction of the training mean: ``mean(y) = mean(log(1 + x)) -
  mean(log(denominator))``, so ``e**mean(y) * stnet_denominator_ >= 1``.
  With ``n_genes + library_`` (smaller, by the superadditivity of the
  geometric mean) a mean-level prediction of a sparse gene fell under the
  floor and was clipped to zero: a constant map for most genes;
- ``log1p`` / ``raw`` -> ``f = counts / library_``.

Shares below zero (a prediction under the scale's floor) are clipped to zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from he2st.data.slide import meta, require_counts
from he2st.errors import GenePanelError, He2stInputError

METHODS = ("cpm_log1p", "hist2st_lognorm", "stnet_norm", "log1p", "raw", "minmax")

#: Scale factor of counts-per-million.
CPM_SCALE = 1e6
#: scprep's ``library_size_normalize`` default rescale (HisToGene, Hist2ST, THItoGene).
SCPREP_SCALE = 1e4


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
    library_, panel_fraction_, stnet_denominator_
        Training constants used only by :meth:`convert` (see the module
        docstring): geometric means over the training spots of the all-gene
        totals, of the panel's share of them and of ST-Net's denominator
        ``n_genes + total`` (None for ``raw``, which may hold no counts).

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
        self.library_: float | None = None
        self.panel_fraction_: float | None = None
        self.stnet_denominator_: float | None = None

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
        if self.needs_counts:
            self._fit_constants(slides, genes, fill_missing)
        if self.method == "minmax":
            self.min_, self.max_ = value_range(_cpm_log1p(s, genes, fill_missing) for s in slides)
        else:
            # Check the panel against every training slide now, not at the first transform.
            for s in slides:
                _column_index(s, genes, fill_missing)
        return self

    def _fit_constants(self, slides: list[Any], genes: list[str], fill_missing: bool) -> None:
        """Training constants of :meth:`convert` (geometric means over spots with positive totals)."""
        log_lib: list[np.ndarray] = []
        log_share: list[np.ndarray] = []
        log_denom: list[np.ndarray] = []
        for s in slides:
            totals = _totals(s)
            panel = _raw(s, genes, fill_missing).astype(np.float64).sum(axis=1)
            ok = totals > 0
            log_lib.append(np.log(totals[ok]))
            log_denom.append(np.log(s.n_vars + totals))
            both = ok & (panel > 0)
            log_share.append(np.log(panel[both] / totals[both]))
        lib, share = np.concatenate(log_lib), np.concatenate(log_share)
        self.library_ = float(np.exp(lib.mean())) if lib.size else 1.0
        self.panel_fraction_ = float(np.exp(share.mean())) if share.size else 1.0
        self.stnet_denominator_ = float(np.exp(np.concatenate(log_denom).mean()))

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
        if self.method == "hist2st_lognorm":
            return _panel_lognorm(slide, genes, fill_missing)
        if self.method == "stnet_norm":
            counts = _raw(slide, genes, fill_missing).astype(np.float64)
            denom = slide.n_vars + _totals(slide).reshape(-1, 1)
            return np.log((1.0 + counts) / denom).astype(np.float32)
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

    # -- moving between scales ----------------------------------------------
    def to_fraction(self, values: np.ndarray, genes: Sequence[str] | None = None) -> np.ndarray:
        """Values on this scale -> estimated share of the spot's all-gene library, ``count / total``.

        Exact for ``cpm_log1p`` and ``minmax``; the other scales use the
        training constants (see the module docstring), never the slide's own
        counts. Negative shares are clipped to zero.

        Parameters
        ----------
        values
            Values on this normaliser's scale, genes in the last axis.
        genes
            Genes of the columns (default: the fitted genes; ``minmax`` only).

        Returns
        -------
        numpy.ndarray
            float64 shares, same shape.
        """
        v = np.asarray(values, dtype=np.float64)
        m = self.method
        if m == "minmax":
            v = np.asarray(self.inverse_transform(values, genes), dtype=np.float64)
        if m in ("cpm_log1p", "minmax"):
            f = np.expm1(v) / CPM_SCALE
        elif m == "hist2st_lognorm":
            f = (np.power(10.0, v) - 1.0) / SCPREP_SCALE * self._constant("panel_fraction_")
        elif m == "stnet_norm":
            lib = self._constant("library_")
            f = (np.exp(v) * self._constant("stnet_denominator_") - 1.0) / lib
        else:
            counts = np.expm1(v) if m == "log1p" else v
            f = counts / self._constant("library_")
        return np.maximum(f, 0.0)

    def from_fraction(self, fraction: np.ndarray, genes: Sequence[str] | None = None) -> np.ndarray:
        """Inverse of :meth:`to_fraction`: library shares -> float32 values on this scale.

        Parameters
        ----------
        fraction
            Shares ``count / total`` (>= 0), genes in the last axis.
        genes
            Genes of the columns (default: the fitted genes; ``minmax`` only).

        Returns
        -------
        numpy.ndarray
            float32 values on this normaliser's scale.
        """
        f = np.maximum(np.asarray(fraction, dtype=np.float64), 0.0)
        m = self.method
        if m in ("cpm_log1p", "minmax"):
            out = np.log1p(f * CPM_SCALE)
            if m == "minmax":
                return self._scaling(self._resolve_genes(genes)).transform(out)
        elif m == "hist2st_lognorm":
            out = np.log10(1.0 + SCPREP_SCALE * f / self._constant("panel_fraction_"))
        elif m == "stnet_norm":
            lib = self._constant("library_")
            out = np.log((1.0 + f * lib) / self._constant("stnet_denominator_"))
        else:
            counts = f * self._constant("library_")
            out = np.log1p(counts) if m == "log1p" else counts
        return out.astype(np.float32)

    def convert(self, values: np.ndarray, to: Normalizer, genes: Sequence[str] | None = None) -> np.ndarray:
        """Map values from this scale to the scale of ``to``, leak-free.

        The identity (a float32 copy) when both normalisers have the same
        method and fitted state; otherwise ``to.from_fraction(self.to_fraction(values))``
        (see "Training scale versus evaluation scale" in the module docstring).

        Parameters
        ----------
        values
            Values on this scale, genes in the last axis.
        to
            The target normaliser (fitted on the same training slides).
        genes
            Genes of the columns (default: the fitted genes).

        Returns
        -------
        numpy.ndarray
            float32 values on the scale of ``to``.
        """
        if to is self or to.get_state() == self.get_state():
            return np.asarray(values, dtype=np.float32).copy()
        return to.from_fraction(self.to_fraction(values, genes), genes)

    def _constant(self, name: str) -> float:
        value = getattr(self, name)
        if value is None:
            raise He2stInputError(f"Normalizer({self.method!r}) has no fitted {name.rstrip('_')}: call fit(train_slides, genes) first")
        return float(value)

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
        for key in ("library", "panel_fraction", "stnet_denominator"):
            value = getattr(self, f"{key}_")
            if value is not None:
                state[key] = float(value)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalizer:
        """Rebuild a normalizer from :meth:`get_state`'s output."""
        obj = cls(state["method"])
        genes = state.get("genes")
        obj.genes_ = None if genes is None else [str(g) for g in genes]
        for key in ("library", "panel_fraction", "stnet_denominator"):
            if state.get(key) is not None:
                setattr(obj, f"{key}_", float(state[key]))
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


def _totals(slide: Any) -> np.ndarray:
    """All-gene count of every spot, float64 ``(n,)``."""
    return np.asarray(slide.X.sum(axis=1), dtype=np.float64).reshape(-1)


def _scaled_log(counts: np.ndarray, totals: np.ndarray, scale: float, base10: bool = False) -> np.ndarray:
    """``log(1 + scale * count / total)`` per spot (natural or base 10); zero-total spots give 0."""
    totals = totals.reshape(-1, 1)
    share = np.divide(counts * scale, totals, out=np.zeros_like(counts), where=totals > 0)
    out = np.log1p(share)
    return (out / np.log(10.0) if base10 else out).astype(np.float32)


def _cpm_log1p(slide: Any, genes: list[str], fill_missing: bool) -> np.ndarray:
    """``ln(1 + 1e6 * count / total)`` with totals over all genes; zero-total spots give 0."""
    counts = _raw(slide, genes, fill_missing).astype(np.float64)
    return _scaled_log(counts, _totals(slide), CPM_SCALE)


def _panel_lognorm(slide: Any, genes: list[str], fill_missing: bool) -> np.ndarray:
    """``log10(1 + 1e4 * count / panel_total)`` (scprep's defaults on the panel columns)."""
    counts = _raw(slide, genes, fill_missing).astype(np.float64)
    return _scaled_log(counts, counts.sum(axis=1), SCPREP_SCALE, base10=True)


__all__ = ["CPM_SCALE", "METHODS", "SCPREP_SCALE", "MinMaxScaler", "Normalizer", "normalize", "value_range"]
