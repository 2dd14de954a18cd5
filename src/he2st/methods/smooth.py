"""Spatial smoothing of any method's predicted maps, its strength chosen by inner cross-validation."""

from __future__ import annotations

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
from he2st.methods.stack import DEFAULT_STRENGTHS


@register_method("smooth")
class Smooth(MetaMethod):
    """Post-process a registered method's maps by graph smoothing over the spot lattice.

    The wrapped method's prediction ``P`` of a slide becomes ``(I + t L)^-1 P``,
    ``L`` the Laplacian of the slide's ring-1 spot graph
    (:func:`he2st.methods.nn.graphs.graph_smooth`): neighbouring spots are pulled
    together, as the spatial priors of Hist2ST/THItoGene's graph layers or of
    TRIPLEX's neighbour view do inside a network, here for any method. The
    strength ``t`` is chosen from ``strengths`` by inner cross-validation: the
    method is fitted leaving out each group of TRAINING slides (a patient when
    there are two or more, else a slide), and ``t`` minimises the held-out MSE
    (``cv_metric="mse"``) or maximises their mean per-gene PCC (``"pcc"``);
    ``t = 0`` (no smoothing) is always a candidate, so smoothing is only applied
    when the training slides say it helps. The method is then refitted on all
    training slides. Cost: ``G + 1`` fits of the wrapped method.

    Parameters
    ----------
    method
        Name of the registered method to wrap (required).
    params
        Its parameters (a dict, without ``normalization``).
    strengths
        Candidate strengths; or a single-element list to fix one without inner fits.
    cv_metric
        ``"mse"`` or ``"pcc"``.
    per_gene
        Choose a strength per gene (from the same candidates).

    Defaults
    --------
    method=None (required), params={}, strengths=[0, 0.125, 0.25, 0.5, 1, 2, 4],
    cv_metric="mse", per_gene=False, normalization="cpm_log1p", seed=0.
    """

    capabilities: ClassVar[Any] = merge_capabilities([], needs_positions=True)
    defaults: ClassVar[dict[str, Any]] = {
        "method": None,
        "params": {},
        "strengths": list(DEFAULT_STRENGTHS),
        "cv_metric": "mse",
        "per_gene": False,
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        name = self.params["method"]
        if not name or not isinstance(name, str):
            raise He2stInputError("method 'smooth': name the method to wrap, e.g. method='ridge'")
        if name == "smooth":
            raise He2stInputError("method 'smooth': smoothing a smoothed method is not supported; widen strengths")
        self._check_choice("cv_metric", ("mse", "pcc"))
        self.capabilities = merge_capabilities([get_method_class(name)], needs_positions=True)  # type: ignore[misc]
        self._prototypes = [self.new_member(name, self.params["params"] or {})]
        self.strength_ = np.zeros(0)
        self.cv_scores_: dict[str, float] = {}

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        slides = train_slides + (val_slides or [])
        strengths = list(self.params["strengths"])
        n_genes = len(self.genes or [])
        build = lambda: self.new_member(self.params["method"], self.params["params"] or {})
        if len(strengths) == 1:
            self.strength_, self.cv_scores_ = np.full(n_genes, float(strengths[0])), {}
        else:
            oof = self.out_of_fold(build, slides)
            targets = [np.asarray(self.targets(s), dtype=np.float64) for s in slides]
            self.strength_, self.cv_scores_ = choose_strength(
                oof, targets, slides, strengths, self.params["cv_metric"], bool(self.params["per_gene"])
            )
        self.members_ = [build().fit(slides, self.genes)]
        self._share_serving()

    def predict(self, slide: Any) -> np.ndarray:
        self._check_fitted()
        pred = np.asarray(self.members_[0].predict(slide), dtype=np.float64)
        return smooth_prediction(pred, slide, self.strength_) if np.any(self.strength_ > 0) else pred.astype(np.float32)

    def predict_uncertainty(self, slide: Any) -> np.ndarray | None:
        """The wrapped method's uncertainty, unsmoothed (None when it has none).

        Parameters
        ----------
        slide
            The slide to predict.

        Returns
        -------
        numpy.ndarray or None
            ``(n_spots, n_genes)`` standard deviations.
        """
        return self.members_[0].predict_uncertainty(slide)

    def own_state(self) -> dict[str, np.ndarray]:
        return {"smooth_strength": self.strength_}

    def set_own_state(self, state: dict[str, np.ndarray]) -> None:
        self.strength_ = np.asarray(state["smooth_strength"], dtype=np.float64)

    def own_extra(self) -> dict[str, Any]:
        s = self.strength_
        return {"strength_median": float(np.median(s)) if s.size else 0.0,
                "strength_counts": {f"{v:g}": int((s == v).sum()) for v in np.unique(s)}, "cv_scores": self.cv_scores_}

    def set_own_extra(self, extra: dict[str, Any]) -> None:
        self.cv_scores_ = dict(extra.get("cv_scores", {}))
