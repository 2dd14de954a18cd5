"""Feature scaling of frozen encoder features, shared by every feature-based method.

A method on frozen features standardises them before its model (ridge's PCA,
k-NN's distances, a neural head). The usual ``StandardScaler`` divides each
dimension by its training sd. Some encoder dimensions barely vary on the
training slides (efficientnet_lite0 on her2st C2-C6 has dimensions with sd
~2e-4), so a small shift of such a dimension on a new slide (another scanner,
stain or section depth) is multiplied by thousands and swamps the others.
:class:`FeatureScaler` offers the standard scaler and robust alternatives:

``"standard"``
    ``(x - mean) / sd`` over the training spots (sd 0 -> 1): the scikit-learn
    ``StandardScaler`` the ported methods use.
``"floor"``
    ``(x - mean) / max(sd, floor * median(sd))``: the sd of each dimension is
    floored at ``floor`` (default 0.1) times the median sd over the
    dimensions, so no dimension is amplified more than ten times beyond a
    typical one. Dimensions with a normal sd are scaled exactly as by
    ``"standard"``.
``"robust"``
    ``(x - median) / max(s, floor * median(s))`` with ``s = IQR / 1.349`` (the
    sd of a normal distribution with that interquartile range): outlying
    spots do not set the scale, and the same floor applies.
``"slide"``
    Per-slide centring: each slide's features minus that slide's own mean
    (training slides at fit, the query slide at predict), divided by the
    floored within-slide sd. It removes a slide-wide shift of the features
    (staining, scanner) before the model. At predict time it uses the query
    slide's features only (no expression, no other slide): a transductive but
    label-free step; a slide's prediction then depends on which spots the
    slide has (a sub-slide gets its own mean).
``"none"``
    The raw features.

The module is numpy only (no torch): ridge and k-NN use :class:`FeatureScaler`
directly, the neural families copy its ``shift_``/``scale_`` into their
``shift``/``scale`` buffers (:func:`scaler_buffers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from he2st.errors import He2stInputError

#: Kinds of :class:`FeatureScaler`.
SCALING_KINDS = ("standard", "floor", "robust", "slide", "none")
#: Floor of ``"floor"``, ``"robust"`` and ``"slide"``: a fraction of the median scale over dimensions.
DEFAULT_FLOOR = 0.1

__all__ = ["DEFAULT_FLOOR", "SCALING_KINDS", "FeatureScaler", "centre_slide", "check_scaling", "scaler_buffers"]


def check_scaling(kind: Any, method: str, allowed: Sequence[str] = SCALING_KINDS) -> str:
    """Check a ``feature_scaling`` value; raise naming the option and the method.

    Parameters
    ----------
    kind
        The value given.
    method
        Method name, quoted in the message.
    allowed
        The kinds the method accepts.

    Returns
    -------
    str
        ``kind``.

    Raises
    ------
    He2stInputError
        ``kind`` is not one of ``allowed``.
    """
    if kind not in allowed:
        raise He2stInputError(f"method {method!r}: feature_scaling must be one of {list(allowed)}, got {kind!r}")
    return str(kind)


def _floored(s: np.ndarray, floor: float) -> np.ndarray:
    """``max(s, floor * median(s > 0))``; all-zero scales become 1."""
    pos = s[s > 0]
    if pos.size == 0:
        return np.ones_like(s)
    return np.maximum(s, floor * float(np.median(pos)))


class FeatureScaler:
    """Per-dimension feature scaling fitted on training slides; see the module docstring.

    Parameters
    ----------
    kind
        ``"standard"``, ``"floor"``, ``"robust"``, ``"slide"`` or ``"none"``.
    floor
        Fraction of the median scale below which a dimension's scale is raised
        (``"floor"``, ``"robust"``, ``"slide"``).
    """

    def __init__(self, kind: str = "standard", floor: float = DEFAULT_FLOOR) -> None:
        self.kind = check_scaling(kind, "FeatureScaler")
        if not (np.isfinite(floor) and floor >= 0):
            raise He2stInputError(f"FeatureScaler: floor must be a non-negative number, got {floor!r}")
        self.floor = float(floor)
        self.shift_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, feats: Sequence[np.ndarray]) -> FeatureScaler:
        """Fit on the training features, one ``(n_i, d)`` array per slide.

        Parameters
        ----------
        feats
            Features of each training slide (or of each group of spots that a
            ``"slide"`` scaler should centre on its own).

        Returns
        -------
        FeatureScaler
            ``self``.
        """
        arrays = [np.asarray(x, dtype=np.float64) for x in feats if len(x)]
        if not arrays:
            raise He2stInputError("FeatureScaler: no training features to fit on")
        kind = self.kind
        if kind == "slide":
            arrays = [x - x.mean(axis=0) for x in arrays]
        X = np.concatenate(arrays)
        d = X.shape[1]
        if kind == "none":
            self.shift_, self.scale_ = np.zeros(d), np.ones(d)
        elif kind == "standard":
            sd = X.std(axis=0)
            # A constant feature carries nothing; scale 1 keeps it at zero (sklearn does the same).
            self.shift_, self.scale_ = X.mean(axis=0), np.where(sd > 0, sd, 1.0)
        elif kind == "floor":
            self.shift_, self.scale_ = X.mean(axis=0), _floored(X.std(axis=0), self.floor)
        elif kind == "robust":
            q1, med, q3 = np.percentile(X, [25, 50, 75], axis=0)
            self.shift_, self.scale_ = med, _floored((q3 - q1) / 1.349, self.floor)
        else:  # slide: already centred per slide
            self.shift_, self.scale_ = np.zeros(d), _floored(X.std(axis=0), self.floor)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale the features of ONE slide (``"slide"`` subtracts that slide's own mean).

        Parameters
        ----------
        X
            ``(n, d)`` features of one slide.

        Returns
        -------
        numpy.ndarray
            ``(n, d)`` float64.
        """
        if self.shift_ is None or self.scale_ is None:
            raise He2stInputError("FeatureScaler: transform before fit")
        X = np.asarray(X, dtype=np.float64)
        if self.kind == "slide" and len(X):
            X = X - X.mean(axis=0)
        return (X - self.shift_) / self.scale_

    def get_state(self) -> dict[str, Any]:
        """The fitted scaler as JSON-able values.

        Returns
        -------
        dict
            ``kind``, ``floor``, ``shift`` and ``scale`` (lists).
        """
        return {"kind": self.kind, "floor": self.floor,
                "shift": None if self.shift_ is None else self.shift_.tolist(),
                "scale": None if self.scale_ is None else self.scale_.tolist()}

    @classmethod
    def from_arrays(cls, kind: str, shift: np.ndarray, scale: np.ndarray, floor: float = DEFAULT_FLOOR) -> FeatureScaler:
        """A fitted scaler from saved arrays.

        Parameters
        ----------
        kind
            Its kind.
        shift, scale
            The fitted ``shift_`` and ``scale_``.
        floor
            Its floor (informational once fitted).

        Returns
        -------
        FeatureScaler
            The scaler.
        """
        out = cls(kind, floor)
        out.shift_ = np.asarray(shift, dtype=np.float64)
        out.scale_ = np.asarray(scale, dtype=np.float64)
        return out


def centre_slide(X: np.ndarray) -> np.ndarray:
    """A slide's features minus their own mean (``"slide"`` scaling of the neural families).

    Parameters
    ----------
    X
        ``(n, d)`` features of one slide.

    Returns
    -------
    numpy.ndarray
        ``X - X.mean(axis=0)`` in ``X``'s dtype.
    """
    X = np.asarray(X)
    return (X - X.mean(axis=0, dtype=np.float64)).astype(X.dtype, copy=False) if len(X) else X


def scaler_buffers(X: np.ndarray, kind: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` for a neural family's feature buffers.

    Parameters
    ----------
    X
        ``(n, d)`` training features (with ``kind="slide"``, already centred per
        slide by :func:`centre_slide`).
    kind
        A kind of :class:`FeatureScaler`.
    rows
        Rows of ``X`` to fit on (None: all).

    Returns
    -------
    tuple of numpy.ndarray
        float64 ``shift`` and ``scale``, each ``(d,)``.
    """
    Xr = np.asarray(X if rows is None else X[rows], dtype=np.float64)
    # The rows are already centred per slide for "slide": fit as one group (the shift is ~0).
    sc = FeatureScaler(kind).fit([Xr])
    assert sc.shift_ is not None and sc.scale_ is not None
    return sc.shift_, sc.scale_
