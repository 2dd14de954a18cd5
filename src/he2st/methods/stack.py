"""Stacked regression over registered methods: per-gene weights learnt by inner cross-validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from he2st.errors import He2stInputError
from he2st.methods.families.meta import (
    MetaMethod,
    choose_strength,
    merge_capabilities,
    smooth_prediction,
)
from he2st.methods.registry import get_method_class, register_method

#: Smoothing strengths tried by the ``smooth`` option of ``stack`` and by the ``smooth`` method.
DEFAULT_STRENGTHS = [0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0]


def member_specs(entries: Any, owner: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, name, params)`` of each member entry: a method name or ``{"name", "params", "label"}``.

    Parameters
    ----------
    entries
        The ``methods`` parameter.
    owner
        The meta method's name, for messages.

    Returns
    -------
    list of tuple
        One per entry; labels default to the name, made unique with ``#<i>``.

    Raises
    ------
    He2stInputError
        An entry that is neither, an unknown method, or fewer than one entry.
    """
    if not isinstance(entries, (list, tuple)) or not entries:
        raise He2stInputError(f"method {owner!r}: methods must be a non-empty list of method names or tables")
    out: list[tuple[str, str, dict[str, Any]]] = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            name, params, label = e, {}, e
        elif isinstance(e, Mapping) and isinstance(e.get("name"), str) and set(e) <= {"name", "params", "label"}:
            name, params, label = e["name"], dict(e.get("params") or {}), str(e.get("label") or e["name"])
        else:
            raise He2stInputError(
                f"method {owner!r}: methods[{i}] must be a method name or a table with 'name' (and optional "
                f"'params', 'label'), got {e!r}"
            )
        if name in ("stack", "smooth"):
            raise He2stInputError(f"method {owner!r}: methods[{i}] is {name!r}; nest meta methods the other way round")
        get_method_class(name)
        if label in [x[0] for x in out]:
            label = f"{label}#{i}"
        out.append((label, name, params))
    return out


def stack_weights(P: np.ndarray, Y: np.ndarray, kind: str, per_gene: bool) -> np.ndarray:
    """Non-negative stacking weights of ``M`` members' out-of-fold predictions.

    Parameters
    ----------
    P
        ``(M, n, g)`` out-of-fold predictions.
    Y
        ``(n, g)`` observed values.
    kind
        ``"nnls"``: non-negative least squares without intercept (Breiman 1996);
        ``"convex"``: non-negative weights summing to one; ``"equal"``: ``1 / M``.
    per_gene
        One weight vector per gene (else one for all genes, fitted on every gene at once).

    Returns
    -------
    numpy.ndarray
        ``(M, g)`` weights.
    """
    from scipy.optimize import nnls

    M, _, g = P.shape
    if kind == "equal":
        return np.full((M, g), 1.0 / M)

    def solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
        if kind == "convex":
            # The sum-to-one constraint as a heavily weighted extra equation.
            big = 1e3 * max(float(np.sqrt((A * A).sum(axis=0)).max()), 1.0)
            A, b = np.vstack([A, np.full((1, M), big)]), np.append(b, big)
        w, _ = nnls(A, b, maxiter=50 * M)
        return w

    if not per_gene:
        return np.repeat(solve(P.reshape(M, -1).T, Y.ravel())[:, None], g, axis=1)
    return np.stack([solve(P[:, :, j].T, Y[:, j]) for j in range(g)], axis=1)


@register_method("stack")
class Stack(MetaMethod):
    """Stacked regression: a per-gene, non-negative combination of registered methods' predictions.

    Stacked generalisation (Wolpert 1992; Breiman, "Stacked regressions",
    Machine Learning 1996): each member method is fitted ``G`` times, leaving
    out one group of TRAINING slides each time (a patient when the training
    slides span two or more, else a slide), and predicts the group left out;
    per gene, non-negative least squares of the observed values on these
    out-of-fold predictions gives the members' weights. The members are then
    refitted on all training slides and the prediction is their weighted sum.
    Test slides are never seen by the weights or the members.

    Cost: every member is fitted ``G + 1`` times (5 times for four training sections).

    Parameters
    ----------
    methods
        Members: method names or tables ``{"name", "params", "label"}``; their
        ``normalization`` is the stack's.
    weights
        ``"nnls"`` (Breiman's non-negative least squares, no intercept),
        ``"convex"`` (non-negative, summing to one) or ``"equal"`` (plain
        average; no inner fits).
    per_gene
        One weight vector per gene (default) or one for all genes.
    smooth
        None, or ``"cv"``: smooth the stacked map over the spot lattice
        (:func:`he2st.methods.nn.graphs.graph_smooth`) with the strength of
        ``smooth_strengths`` that scores best on the stacked out-of-fold
        predictions (``cv_metric``).
    smooth_strengths, cv_metric, per_gene_smoothing
        Candidates, criterion (``"mse"`` or ``"pcc"``) and per-gene choice of the smoothing strength.

    Defaults
    --------
    methods=["ridge", "knn"], weights="nnls", per_gene=True, smooth=None,
    smooth_strengths=[0, 0.125, 0.25, 0.5, 1, 2, 4], cv_metric="mse",
    per_gene_smoothing=False, normalization="cpm_log1p", seed=0 (given to every member).
    """

    capabilities: ClassVar[Any] = merge_capabilities([])
    defaults: ClassVar[dict[str, Any]] = {
        "methods": ["ridge", "knn"],
        "weights": "nnls",
        "per_gene": True,
        "smooth": None,
        "smooth_strengths": list(DEFAULT_STRENGTHS),
        "cv_metric": "mse",
        "per_gene_smoothing": False,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._check_choice("weights", ("nnls", "convex", "equal"))
        self._check_choice("smooth", (None, "cv"))
        self._check_choice("cv_metric", ("mse", "pcc"))
        self.specs_ = member_specs(self.params["methods"], self.name)
        self.capabilities = merge_capabilities([get_method_class(n) for _, n, _ in self.specs_])  # type: ignore[misc]
        # Built now so that each member's own checks (parameters, weights files) run at construction.
        self._prototypes = [self.new_member(n, p) for _, n, p in self.specs_]
        self.weights_ = np.zeros((0, 0))
        self.strength_ = np.zeros(0)
        self.cv_: dict[str, Any] = {}

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        slides = train_slides + (val_slides or [])
        targets = [np.asarray(self.targets(s), dtype=np.float64) for s in slides]
        n_genes = len(self.genes or [])
        kind = self.params["weights"]
        oof = None
        if kind != "equal" or self.params["smooth"] == "cv":
            oof = [self.out_of_fold(lambda n=n, p=p: self.new_member(n, p), slides) for _, n, p in self.specs_]
        if kind == "equal":
            self.weights_ = np.full((len(self.specs_), n_genes), 1.0 / len(self.specs_))
        else:
            P = np.stack([np.concatenate(o) for o in oof])
            self.weights_ = stack_weights(P, np.concatenate(targets), kind, bool(self.params["per_gene"]))
        self.strength_ = np.zeros(n_genes)
        self.cv_ = {}
        if oof is not None:
            stacked = [sum(w * o[i] for w, o in zip(self.weights_, oof)) for i in range(len(slides))]
            self.cv_["oof_mse"] = float(np.mean(np.concatenate([(p - y) ** 2 for p, y in zip(stacked, targets)])))
            if self.params["smooth"] == "cv":
                self.strength_, self.cv_["smooth_scores"] = choose_strength(
                    stacked, targets, slides, self.params["smooth_strengths"], self.params["cv_metric"],
                    bool(self.params["per_gene_smoothing"]),
                )
        self.members_ = [self.new_member(n, p).fit(slides, self.genes) for _, n, p in self.specs_]
        self._share_serving()

    def predict(self, slide: Any) -> np.ndarray:
        self._check_fitted()
        out = np.zeros((slide.n_obs, self.weights_.shape[1]))
        for w, m in zip(self.weights_, self.members_):
            if np.any(w > 0):
                out += w * np.asarray(m.predict(slide), dtype=np.float64)
        if np.any(self.strength_ > 0):
            return smooth_prediction(out, slide, self.strength_)
        return out.astype(np.float32)

    def own_state(self) -> dict[str, np.ndarray]:
        return {"stack_weights": self.weights_, "smooth_strength": self.strength_}

    def set_own_state(self, state: dict[str, np.ndarray]) -> None:
        self.weights_ = np.asarray(state["stack_weights"], dtype=np.float64)
        self.strength_ = np.asarray(state["smooth_strength"], dtype=np.float64)

    def own_extra(self) -> dict[str, Any]:
        w = self.weights_
        return {
            "member_labels": [label for label, _, _ in self.specs_],
            "mean_weight": {label: float(w[i].mean()) for i, (label, _, _) in enumerate(self.specs_)},
            "smooth_strength_median": float(np.median(self.strength_)) if self.strength_.size else 0.0,
            **self.cv_,
        }

    def set_own_extra(self, extra: dict[str, Any]) -> None:
        self.cv_ = {k: v for k, v in extra.items() if k in ("oof_mse", "smooth_scores")}
