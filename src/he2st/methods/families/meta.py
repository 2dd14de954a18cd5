"""The meta family: methods built from other registered methods (ensemble, stack, smooth).

What they share lives here, once:

- :class:`MetaMethod`: members are ordinary registered methods, built with the
  meta method's evaluation scale (``normalization``) so that their predictions
  can be combined; saving and loading store each member's parameters, panel,
  normalisers, serving state and arrays under ``member<i>.``.
- :meth:`MetaMethod.out_of_fold`: inner cross-validation over the TRAINING
  slides (leave one group out; a group is a patient when the training slides
  span two patients or more, else a slide), the only data from which a meta
  method learns its own weights or strengths. The test slide is never seen.
- :func:`choose_strength`: the graph-smoothing strength with the best inner-CV
  score (MSE by default), globally or per gene; used by ``smooth`` and by
  ``stack``'s ``smooth`` option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.methods.base import Capabilities, EncoderUse, Method
from he2st.methods.registry import get_method_class

__all__ = ["MetaMethod", "choose_strength", "inner_groups", "merge_capabilities", "smooth_prediction"]


def inner_groups(slides: Sequence[Any]) -> list[list[int]]:
    """Held-out groups of the inner cross-validation: by patient when there are two or more, else by slide.

    Parameters
    ----------
    slides
        The training slides.

    Returns
    -------
    list of list of int
        Indices into ``slides``, one list per held-out group, in first-seen order.
    """
    patients = [meta(s).patient for s in slides]
    key = patients if len(set(patients)) >= 2 else [meta(s).slide_id for s in slides]
    order = list(dict.fromkeys(key))
    return [[i for i, k in enumerate(key) if k == g] for g in order]


def merge_capabilities(classes: Sequence[type[Method]], **override: bool) -> Capabilities:
    """The union of the members' needs (tokens, positions, whole slides, labels).

    Parameters
    ----------
    classes
        Member method classes.
    **override
        Fields to set regardless (e.g. ``uncertainty=True`` for an ensemble).

    Returns
    -------
    Capabilities
        Needs OR-ed over the members; ``frozen_features``/``finetune`` when any member has them.
    """
    fields = [f.name for f in dataclasses.fields(Capabilities)]
    merged = {f: any(getattr(c.capabilities, f) for c in classes) for f in fields}
    merged["uncertainty"] = False
    merged.update(override)
    return Capabilities(**merged)


def smooth_prediction(values: np.ndarray, slide: Any, strength: float | np.ndarray) -> np.ndarray:
    """A predicted map smoothed over the slide's spot lattice (see :func:`he2st.methods.nn.graphs.graph_smooth`).

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` predictions of ``slide``.
    slide
        The slide (its ``obsm["spatial"]`` gives the lattice).
    strength
        One strength, or one per gene.

    Returns
    -------
    numpy.ndarray
        float32 smoothed predictions, same shape.
    """
    from he2st.methods.nn.graphs import graph_smooth

    return graph_smooth(values, np.asarray(slide.obsm["spatial"], dtype=np.float64), strength).astype(np.float32)


def choose_strength(
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    slides: Sequence[Any],
    strengths: Sequence[float],
    metric: str = "mse",
    per_gene: bool = False,
) -> tuple[np.ndarray, dict[str, float]]:
    """The smoothing strength with the best inner-CV score over held-out training slides.

    Parameters
    ----------
    preds, targets
        Per held-out slide: out-of-fold predictions and observed values, ``(n_i, g)``.
    slides
        The held-out slides (their spot lattices).
    strengths
        Candidate strengths (0 = no smoothing); ties go to the weaker one.
    metric
        ``"mse"`` (pooled mean squared error, lower is better) or ``"pcc"``
        (mean per-gene Pearson correlation within each slide, then over slides).
    per_gene
        Choose a strength per gene (from the same candidates) instead of one for all genes.

    Returns
    -------
    strength, scores
        ``(g,)`` chosen strength per gene (all equal unless ``per_gene``) and the
        global score of each candidate (``{"<strength>": score}``, higher is better).

    Raises
    ------
    He2stInputError
        An empty or negative candidate list, or an unknown metric.
    """
    from he2st._stats import pearson_per_gene

    cand = np.asarray(list(strengths), dtype=np.float64)
    if cand.size == 0 or not np.all(np.isfinite(cand)) or np.any(cand < 0):
        raise He2stInputError(f"smoothing strengths must be non-negative numbers, got {list(strengths)!r}")
    if metric not in ("mse", "pcc"):
        raise He2stInputError(f"smoothing cv_metric must be 'mse' or 'pcc', got {metric!r}")
    n_genes = preds[0].shape[1]
    per = np.zeros((len(cand), n_genes))  # per-gene score of each candidate, higher is better
    for j, t in enumerate(cand):
        for p, y, s in zip(preds, targets, slides, strict=True):
            q = smooth_prediction(p, s, float(t)) if t > 0 else p
            if metric == "mse":
                per[j] -= ((q - y) ** 2).sum(axis=0)
            else:
                r, _ = pearson_per_gene(y, q)
                per[j] += np.nan_to_num(r, nan=0.0) / len(preds)
    if metric == "mse":
        per /= sum(len(y) for y in targets)
    overall = per.mean(axis=1)
    scores = {f"{t:g}": float(v) for t, v in zip(cand, overall)}
    order = np.argsort(cand, kind="stable")  # weakest first, so that ties go to the weaker strength
    if per_gene:
        return cand[order[np.argmax(per[order], axis=0)]], scores
    best = int(order[np.argmax(overall[order])])
    return np.full(n_genes, cand[best]), scores


class MetaMethod(Method):
    """Base class of methods made of other registered methods (the ``meta`` family).

    Subclasses build members with :meth:`new_member`, fit them in ``_fit`` and
    keep them in :attr:`members_`; persistence of the members is handled here.
    """

    family: ClassVar[str] = "meta"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.members_: list[Method] = []

    # -- members --------------------------------------------------------------------------------
    def new_member(self, name: str, params: Mapping[str, Any], seed: int | None = None) -> Method:
        """A fresh, unfitted member on this method's evaluation scale.

        Parameters
        ----------
        name
            Registered method name.
        params
            Its parameters (without ``normalization``, which the meta method sets).
        seed
            Its seed (default: this method's).

        Returns
        -------
        Method
            The member (its own parameter checks have run).
        """
        cls = get_method_class(name)
        if "normalization" in params:
            raise He2stInputError(
                f"method {self.name!r}: member {name!r} may not set 'normalization' (the members predict on "
                f"{self.name!r}'s evaluation scale, {self.params['normalization']!r})"
            )
        kw = {**params, "normalization": self.params["normalization"]}
        kw["seed"] = int(self.params["seed"] if seed is None else seed)
        return cls(**kw)

    def out_of_fold(self, build: Callable[[], Method], slides: Sequence[Any]) -> list[np.ndarray]:
        """Predictions of each training slide by a member fitted without its group (inner CV).

        Parameters
        ----------
        build
            Returns a fresh unfitted member.
        slides
            The training slides.

        Returns
        -------
        list of numpy.ndarray
            ``(n_spots, n_genes)`` out-of-fold predictions, one per slide, in ``slides`` order.

        Raises
        ------
        He2stInputError
            Fewer than two training slides (nothing to hold out).
        """
        slides = list(slides)
        groups = inner_groups(slides)
        if len(groups) < 2:
            raise He2stInputError(
                f"method {self.name!r} learns its weights by inner cross-validation over training slides and "
                f"needs at least 2 training slides (or patients), got {len(slides)}"
            )
        out: list[np.ndarray | None] = [None] * len(slides)
        for held in groups:
            rest = [s for i, s in enumerate(slides) if i not in held]
            m = build().fit(rest, self.genes)
            for i in held:
                out[i] = np.asarray(m.predict(slides[i]), dtype=np.float64)
        return out  # type: ignore[return-value]

    def _share_serving(self) -> None:
        """The first member's field of view, and the members' encoder weights (each once), as the meta method's own."""
        if self.members_:
            first = self.members_[0]
            self.patch_um_, self.train_mpp_ = first.patch_um_, first.train_mpp_
            ids = {(e.get("encoder"), e.get("weights"), e.get("trained")): e for m in self.members_ for e in m.encoder_ids_}
            self.encoder_ids_ = list(ids.values())

    def encoders(self) -> list[EncoderUse]:
        """The members' encoders, each once (from the prototypes before fitting)."""
        return list(dict.fromkeys(u for m in self._members() for u in m.encoders()))

    def _members(self) -> list[Method]:
        """The fitted members, or before fitting the unfitted member prototypes."""
        return getattr(self, "members_", None) or getattr(self, "_prototypes", [])

    def feature_requests(self, train_slides: Sequence[Any], slides: Sequence[Any]) -> list[dict[str, Any]]:
        """The members' frozen-feature requests (see :meth:`Method.feature_requests`), so that an executor
        computes them first for a meta method too.

        Parameters
        ----------
        train_slides
            The fold's training slides.
        slides
            Every slide the fit and its predictions read.

        Returns
        -------
        list of dict
            Every member prototype's requests (the executor keeps one task per distinct request).
        """
        return [r for m in self._members() for r in m.feature_requests(train_slides, slides)]

    def _fit_scale(self, slides: Sequence[Any]) -> None:
        """Nothing here: each member fixes its own field of view; :meth:`_share_serving` reports the first's."""

    def check_servable(self, slide: Any) -> None:
        """Each member's checks (see :meth:`Method.check_servable`).

        Parameters
        ----------
        slide
            The slide to predict.
        """
        for m in self.members_:
            m.check_servable(slide)

    # -- persistence ----------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for i, m in enumerate(self.members_):
            state.update({f"member{i}.{k}": v for k, v in m.get_state().items()})
        return {**state, **self.own_state()}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        for i, m in enumerate(self.members_):
            prefix = f"member{i}."
            m.set_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self.set_own_state({k: v for k, v in state.items() if not k.startswith("member")})

    def own_state(self) -> dict[str, np.ndarray]:
        """Arrays of the meta method itself (weights, strengths); none by default."""
        return {}

    def set_own_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`own_state`.

        Parameters
        ----------
        state
            The arrays :meth:`own_state` returned.
        """

    def get_extra(self) -> dict[str, Any]:
        return {
            "members": [
                {
                    "name": m.name,
                    "params": m.params,
                    "genes": m.genes,
                    "normalizer": m.normalizer_.get_state(),
                    "train_normalizer": (m.train_normalizer_ or m.normalizer_).get_state(),
                    "extra": m.get_extra(),
                    "serving": m._serving_state(),
                }
                for m in self.members_
            ],
            **self.own_extra(),
        }

    def set_extra(self, extra: dict[str, Any]) -> None:
        from he2st.pp.normalize import Normalizer

        self.members_ = []
        for cfg in extra.get("members", []):
            m = get_method_class(cfg.get("name") or self.params.get("method"))(**cfg["params"])
            m.genes = list(cfg["genes"])
            m.normalizer_ = Normalizer.from_state(cfg["normalizer"])
            m.train_normalizer_ = Normalizer.from_state(cfg.get("train_normalizer") or cfg["normalizer"])
            m._set_serving_state(cfg.get("serving"))
            m.set_extra(cfg.get("extra", {}))
            self.members_.append(m)
        self._share_serving()
        self.set_own_extra({k: v for k, v in extra.items() if k != "members"})

    def own_extra(self) -> dict[str, Any]:
        """JSON record of the meta method itself (chosen weights, CV scores); empty by default."""
        return {}

    def set_own_extra(self, extra: dict[str, Any]) -> None:
        """Inverse of :meth:`own_extra`.

        Parameters
        ----------
        extra
            The record :meth:`own_extra` returned.
        """
