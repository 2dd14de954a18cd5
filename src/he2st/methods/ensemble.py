"""A deep ensemble of any registered method: mean prediction and spread as uncertainty."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import numpy as np

from he2st.errors import He2stInputError, RandomWeightsWarning
from he2st.methods.base import Capabilities
from he2st.methods.families.meta import MetaMethod
from he2st.methods.registry import get_method_class, register_method


@register_method("ensemble")
class Ensemble(MetaMethod):
    """Train a registered method ``n_members`` times with different seeds; average; report the spread.

    A deep ensemble (Lakshminarayanan et al., "Simple and scalable predictive
    uncertainty estimation using deep ensembles", NeurIPS 2017), as STimage
    uses for its predictions (Tan et al. 2023), available for every method of
    he2st. Member ``i`` is ``create_method(method, **params, seed=seed + i,
    normalization=normalization)`` fitted on the same slides and panel.

    - :meth:`predict`: the mean of the members' predictions.
    - :meth:`predict_uncertainty`: the standard deviation of the members'
      predictions (population form, ``ddof=0``), per spot and gene. When the
      members give their own uncertainty (e.g. ``stimage``), the law of total
      variance combines both: ``sqrt(mean_i sd_i**2 + var_i pred_i)``.
      Identical members (a deterministic method, or ``vary_seed=False``) have
      zero spread.

    Parameters
    ----------
    method
        Name of the registered method to wrap (required).
    n_members
        Number of members (default 5, as STimage).
    params
        Parameters of every member (a dict); ``seed`` and ``normalization``
        are set by the ensemble and may not appear here.
    vary_seed
        Give member ``i`` the seed ``seed + i`` (default True); False trains
        every member with ``seed`` (useful to measure run-to-run noise of
        non-deterministic hardware).

    Defaults
    --------
    method=None (required), n_members=5, params={}, vary_seed=True,
    normalization=the wrapped method's default evaluation scale (``"cpm_log1p"``
    for the built-ins; members still train on their own ``train_normalization``,
    set it through ``params``), seed=0.

    Examples
    --------
    >>> m = he2st.methods.create_method("ensemble", method="stnet", n_members=5, params={"lr": 1e-3})
    >>> m.fit(train_slides, panel)
    >>> mean, sd = m.predict(test_slide), m.predict_uncertainty(test_slide)
    """

    family: ClassVar[str] = "meta"
    capabilities: ClassVar[Capabilities] = Capabilities(uncertainty=True)
    defaults: ClassVar[dict[str, Any]] = {"method": None, "n_members": 5, "params": {}, "vary_seed": True}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        name = self.params["method"]
        if not name or not isinstance(name, str):
            raise He2stInputError("method 'ensemble': name the method to wrap, e.g. method='stnet'")
        if name == "ensemble":
            raise He2stInputError("method 'ensemble': an ensemble of ensembles is not supported; raise n_members")
        self.member_class_ = get_method_class(name)
        member_params = self.params["params"] or {}
        if not isinstance(member_params, dict):
            raise He2stInputError(f"method 'ensemble': params must be a dict of member parameters, got {type(member_params).__name__}")
        clash = {"seed", "normalization"} & set(member_params)
        if clash:
            raise He2stInputError(
                f"method 'ensemble': {sorted(clash)} are set by the ensemble (seed + i, its own normalization); "
                "remove them from params"
            )
        self.params["params"] = dict(member_params)
        if "normalization" not in params:
            # Unless told otherwise, the members keep their own evaluation scale.
            member_defaults = {**self.member_class_.common_defaults, **self.member_class_.defaults}
            self.params["normalization"] = member_defaults["normalization"]
        if int(self.params["n_members"]) < 1:
            raise He2stInputError(f"method 'ensemble': n_members must be >= 1, got {self.params['n_members']!r}")
        # The wrapped method's needs (tokens, positions, whole slides) are the ensemble's needs.
        self.capabilities = dataclasses.replace(self.member_class_.capabilities, uncertainty=True)  # type: ignore[misc]
        self._memo: tuple[Any, np.ndarray, np.ndarray] | None = None
        # A member built now runs its own checks (weights files included) at the ensemble's construction.
        self._prototypes = [self._member(0)]

    def _member(self, i: int) -> Any:
        seed = int(self.params["seed"]) + (i if self.params["vary_seed"] else 0)
        return self.new_member(self.params["method"], self.params["params"], seed=seed)

    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        self._memo = None
        self.members_ = []
        with warnings.catch_warnings():
            # The ensemble warned once for all members (Method.fit); members stay quiet.
            warnings.simplefilter("ignore", RandomWeightsWarning)
            for i in range(int(self.params["n_members"])):
                self.members_.append(self._member(i).fit(train_slides, self.genes, val_slides))
        self._share_serving()

    def set_own_extra(self, extra: dict[str, Any]) -> None:
        """Nothing of its own to restore; drops the memo of the last prediction.

        Parameters
        ----------
        extra
            Unused.
        """
        self._memo = None

    def _predict_all(self, slide: Any) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the members (one pass for both)."""
        self._check_fitted()
        if not self.members_:
            raise He2stInputError("method 'ensemble' is not fitted: call fit() first")
        if self._memo is not None and self._memo[0] is slide:
            return self._memo[1], self._memo[2]
        preds = np.stack([np.asarray(m.predict(slide), dtype=np.float64) for m in self.members_])
        own = [m.predict_uncertainty(slide) for m in self.members_]
        var = preds.var(axis=0)
        if all(u is not None for u in own):
            var = var + np.mean([np.asarray(u, dtype=np.float64) ** 2 for u in own], axis=0)
        mean, sd = preds.mean(axis=0).astype(np.float32), np.sqrt(var).astype(np.float32)
        self._memo = (slide, mean, sd)
        return mean, sd

    def predict(self, slide: Any) -> np.ndarray:
        return self._predict_all(slide)[0]

    def predict_uncertainty(self, slide: Any) -> np.ndarray:
        return self._predict_all(slide)[1]
