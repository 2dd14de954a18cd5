"""What every method that predicts from a reference bank of training spots shares.

:class:`BankedMethod` is the common base of the contrastive retrieval family
(BLEEP, mclSTExp, CMRCNet) and the exemplar graph family (SpaHGC, EGGN): a
trained network ``net_``, a :class:`~he2st.retrieval.ReferenceBank` ``bank_``
with per-slide provenance, the leakage rule applied to every query slide
(:meth:`he2st.retrieval.ReferenceBank.query_exclusions`), and the JSON facts
saved next to the weights and the bank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.methods.base import Method
from he2st.retrieval.bank import ReferenceBank


class BankedMethod(Method):
    """A method with a network (``net_``) and a reference bank of training spots (``bank_``).

    Subclasses fill ``net_``, ``bank_``, ``_net_spec`` (what rebuilds the
    network), ``_train_info`` (``slides``, ``patients``, ``val_slides``) and
    ``history_`` in ``_fit``; they read ``on_bank_overlap`` and
    ``exclude_test_patient`` from their parameters.
    """

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.net_: Any = None
        self.bank_: ReferenceBank | None = None
        self.history_: dict[str, Any] = {}
        self._net_spec: dict[str, Any] = {}
        self._train_info: dict[str, Any] = {}
        self._bank_meta: dict[str, Any] = {}

    def _check_ready(self) -> None:
        self._check_fitted()
        if self.net_ is None or self.bank_ is None:
            raise He2stInputError(f"method {self.name!r} is not fitted: call fit() first")

    def _exclusions(self, slide: Any) -> np.ndarray | None:
        """Bank rows a query slide may not retrieve (its own rows; its patient's slides)."""
        assert self.bank_ is not None
        m = meta(slide)
        return self.bank_.query_exclusions(
            m.slide_id, m.patient, on_overlap=self.params["on_bank_overlap"],
            exclude_patient=self.params["exclude_test_patient"], train_patients=self._train_info.get("patients", []),
            what=f"predicting with method {self.name!r}",
        )

    def get_extra(self) -> dict[str, Any]:
        self._check_ready()
        assert self.bank_ is not None
        return {"net": self._net_spec, "bank": self.bank_.state_meta(), "train": self._train_info,
                "history": self.history_}

    def set_extra(self, extra: dict[str, Any]) -> None:
        self._net_spec = dict(extra.get("net", {}))
        self._bank_meta = extra.get("bank", {})
        self._train_info = dict(extra.get("train", {}))
        self.history_ = dict(extra.get("history", {}))


__all__ = ["BankedMethod"]
