"""The machinery shared by the cross-slide exemplar graph methods (SpaHGC, EGGN).

Both predict the spots of a slide ("target" nodes) from a heterogeneous graph
that also holds their most similar spots of the TRAINING slides ("reference"
or exemplar nodes), whose expression is known. A subclass of
:class:`ExemplarGraphMethod` says only how its network is built
(:meth:`~ExemplarGraphMethod._make_net`, an :class:`ExemplarGraphNet`); the
features, the reference bank, the graphs, training, leakage guards and
persistence live here once.

Data flow
---------
1. Frozen patch embeddings of every spot (:func:`he2st.encoders.get_features`,
   cached; ``encoder``, ``weights``, ``patch_px``, ``patch_um``).
2. The reference bank (:class:`he2st.retrieval.ReferenceBank`): the embedding
   and training-scale expression of every TRAINING spot, searched by
   ``select_metric``. Validation slides (``fit(..., val_slides=)``, nested CV)
   are never in it: they are queried like test slides, and the weights of the
   epoch with the lowest validation MSE are kept.
3. One graph per slide (:func:`he2st.methods.nn.hetero.exemplar_graph`): its
   spots, the ``top_k`` bank spots retrieved for each by image embedding, and
   the ``TS``/``CS``/``RS`` edges (``edges`` switches them). A TRAINING slide's
   references come from the OTHER training slides (its own rows are excluded,
   as in both authors' code); a predicted slide's from the whole bank, minus
   the leakage rule below.
4. Training: one optimiser step per training-slide graph, ``epochs`` passes
   (both papers train on whole-slide graphs, batch size 1), slide order fixed
   unless ``shuffle``. The network's loss comes from the subclass.

Leakage guards
--------------
The bank records every slide's id, patient and origin.
:meth:`ExemplarGraphMethod.predict` refuses a slide that is in the bank
(``on_bank_overlap="error"``) or leaves its rows out (``"exclude"``), and with
``exclude_test_patient`` (``"auto"``: when no training slide is from the test
patient) leaves out the patient's slides
(:meth:`he2st.retrieval.ReferenceBank.query_exclusions`, the rule the
contrastive methods use too). The bank is built in ``fit`` from the slides
given to ``fit`` only, so a benchmark fold's test slide (and, under nested
CV, its validation slide) can never be a reference.

Prediction needs only the image: the bank (embeddings and expression) is
saved with the model, so image-only slides are predicted like any other.

``context`` (default None) appends wider fields of view and/or neighbour means
to each spot's frozen features (:func:`he2st.methods.base.parse_context`); the
graph's edges are unchanged.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.methods.base import CONTEXT_DEFAULTS, FIELD_OF_VIEW_DEFAULTS, Capabilities
from he2st.methods.families.banked import BankedMethod
from he2st.methods.nn.hetero import (
    CS,
    EDGE_TYPES,
    REFERENCE,
    RS,
    TARGET,
    TS,
    check_edges,
    exemplar_graph,
)
from he2st.methods.nn.inputs import image_inputs
from he2st.methods.nn.train import (
    History,
    default_device,
    fit_module,
    load_module_state,
    module_state,
    set_seed,
)
from he2st.retrieval.bank import ReferenceBank
from he2st.retrieval.search import METRICS

OVERLAP = ("error", "exclude")

#: Keys every exemplar graph method understands; subclasses give their paper's values.
GRAPH_DEFAULTS: dict[str, Any] = {
    "encoder": "efficientnet_lite0",
    "weights": "imagenet",
    "patch_px": 224,
    "top_k": 7,
    "select_metric": "l1",
    "q": 5,
    "ts_max_distance": None,
    "rs_k": 3,
    "rs_metric": "l2",
    "edges": ["ts", "cs", "rs"],
    "hidden": 256,
    "layers": 4,
    "epochs": 200,
    "lr": 1e-4,
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "shuffle": False,
    "grad_clip": None,
    "exclude_test_patient": "auto",
    "on_bank_overlap": "error",
    "device": "auto",
    **FIELD_OF_VIEW_DEFAULTS,
    **CONTEXT_DEFAULTS,
}


class ExemplarGraphNet(nn.Module):
    """A network over exemplar graphs: :meth:`forward` predicts, :meth:`loss` trains.

    Both receive a :class:`torch_geometric.data.HeteroData` from
    :func:`he2st.methods.nn.hetero.exemplar_graph` (on the training device).
    """

    @abc.abstractmethod
    def forward(self, graph: Any) -> torch.Tensor:
        """``(n_targets, n_genes)`` predictions on the training scale (no augmentation)."""

    @abc.abstractmethod
    def loss(self, graph: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar training loss of one graph.

        Parameters
        ----------
        graph
            An exemplar graph with targets in ``graph["target"].y``.
        generator
            Random generator of the masks (methods that mask).

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """


def graph_inputs(graph: Any) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[str, str, str], torch.Tensor]]:
    """``(target features, reference features, {edge type: edge index})`` of a graph."""
    edges = {et: graph[et].edge_index for et in (TS, CS, RS) if et in graph.edge_types}
    return graph[TARGET].x, graph[REFERENCE].x, edges


class ExemplarGraphMethod(BankedMethod):
    """Base of SpaHGC and EGGN; see the module docstring.

    Subclasses give their paper's ``defaults`` and implement :meth:`_make_net`.
    """

    family: ClassVar[str] = "graph"
    capabilities: ClassVar[Capabilities] = Capabilities(frozen_features=True, needs_positions=True,
                                                        needs_whole_slides=True)
    defaults: ClassVar[dict[str, Any]] = dict(GRAPH_DEFAULTS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._check_params()

    # -- hooks ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _make_net(self, feature_dim: int, n_genes: int) -> ExemplarGraphNet:
        """The method's network for embeddings of width ``feature_dim``."""

    # -- parameters ------------------------------------------------------------------------
    def _check_params(self) -> None:
        p = self.params

        self._check_choice("select_metric", METRICS)
        self._check_choice("rs_metric", METRICS)
        self._check_choice("on_bank_overlap", OVERLAP)
        self._check_choice("exclude_test_patient", ("auto", True, False))
        try:
            check_edges(p["edges"])
        except He2stInputError as err:
            raise He2stInputError(f"method {self.name!r}: {err}") from None
        for key in ("top_k", "hidden", "layers", "epochs"):
            if int(p[key]) < 1:
                raise He2stInputError(f"method {self.name!r}: {key} must be >= 1, got {p[key]!r}")
        for key in ("q", "rs_k"):
            if int(p[key]) < 0:
                raise He2stInputError(f"method {self.name!r}: {key} must be >= 0, got {p[key]!r}")
        if p["ts_max_distance"] is not None and float(p["ts_max_distance"]) <= 0:
            raise He2stInputError(f"method {self.name!r}: ts_max_distance must be positive or None")

    # -- data ------------------------------------------------------------------------------
    def _features(self, slide: Any) -> np.ndarray:
        """Frozen patch embeddings ``(n, d)`` float32 of a slide (cached)."""
        p = self.params
        self.check_servable(slide)
        return image_inputs(slide, "frozen", p["encoder"], p["weights"], int(p["patch_px"]),
                            dim=self._net_spec.get("feature_dim"), target_mpp=self.read_mpp(slide),
                            context=p["context"])

    def _coords(self, slide: Any) -> np.ndarray:
        """Spot centres in the slide's own pixels.

        No rescaling to the training pixel frame: the spatial edges are the ``q`` nearest
        spots and their distance cap is in units of the slide's own spot pitch, both the
        same in any pixel unit.
        """
        return np.asarray(slide.obsm["spatial"], dtype=np.float64)

    def _graph(self, slide_id: str, xy: np.ndarray, x: np.ndarray, exclude: np.ndarray | None,
               y: np.ndarray | None = None) -> Any:
        """The exemplar graph of one slide: retrieve, then connect."""
        from he2st.methods.nn.graphs import spot_spacing

        assert self.bank_ is not None
        p = self.params
        nb = self.bank_.search(x, int(p["top_k"]), exclude=exclude)
        if nb.indices.shape[1] == 0 or not (nb.indices >= 0).any():
            raise He2stInputError(
                f"slide {slide_id!r}: method {self.name!r} found no reference spot to retrieve "
                f"(bank slides {self.bank_.slide_ids}, all excluded for this slide); train on more slides"
            )
        max_d = p["ts_max_distance"]
        return exemplar_graph(
            xy, x, nb.indices, self.bank_.embeddings, self.bank_.values, q=int(p["q"]), rs_k=int(p["rs_k"]),
            rs_metric=str(p["rs_metric"]), edges=p["edges"], target_y=y,
            ts_max_distance=None if max_d is None else float(max_d) * spot_spacing(xy),
        )

    # -- fitting ---------------------------------------------------------------------------
    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        p = self.params
        gen = set_seed(int(p["seed"]))
        device = default_device(p["device"])
        slides = list(train_slides) + list(val_slides or [])
        X = [self._features(s) for s in slides]
        Y = [np.asarray(self.train_targets(s), dtype=np.float32) for s in slides]
        ids = [meta(s).slide_id for s in slides]
        n_train = len(train_slides)
        if n_train < 2:
            raise He2stInputError(
                f"method {self.name!r} needs at least 2 training slides: a training slide's references "
                f"come from the other training slides (got {ids[:n_train]})"
            )
        # The bank holds the TRAINING slides only: a validation slide (nested CV) is a query like
        # a test slide, so its loss measures retrieval from slides the model was fitted on.
        blocks = [(X[i], Y[i], ids[i], meta(slides[i]).patient, "train") for i in range(n_train)]
        self.bank_ = ReferenceBank.from_blocks(blocks, metric=p["select_metric"], genes=self.genes)
        self.bank_.build_index("exact")
        self._train_info = {"slides": ids[:n_train], "patients": sorted({meta(s).patient for s in train_slides}),
                            "val_slides": ids[n_train:]}
        # A training slide never retrieves its own spots (both authors' code); its patient's other
        # slides stay eligible, as in the authors' code. Validation slides follow predict's rule.
        graphs = [self._graph(sid, self._coords(s), x,
                              self.bank_.rows_of(slide_ids=[sid]) if i < n_train else self._exclusions(s), y)
                  for i, (s, sid, x, y) in enumerate(zip(slides, ids, X, Y))]
        train_g, val_g = graphs[:n_train], graphs[n_train:]

        self._net_spec = {"feature_dim": int(X[0].shape[1]), "n_genes": len(self.genes or [])}
        net = self._make_net(self._net_spec["feature_dim"], self._net_spec["n_genes"]).to(device)
        train_g = [g.to(device) for g in train_g]
        val_g = [g.to(device) for g in val_g]
        mask_gen = torch.Generator().manual_seed(int(p["seed"]))

        def train_batches(epoch: int) -> Any:
            order = torch.randperm(len(train_g), generator=gen).tolist() if p["shuffle"] else range(len(train_g))
            yield from order

        history: History = fit_module(
            net, lambda i: net.loss(train_g[i], mask_gen), train_batches, epochs=int(p["epochs"]), lr=float(p["lr"]),
            optimizer=str(p["optimizer"]), weight_decay=float(p["weight_decay"]),
            val_batches=(lambda: range(len(val_g))) if val_g else None,
            val_loss_fn=lambda i: nn.functional.mse_loss(net(val_g[i]), val_g[i][TARGET].y),
            grad_clip=None if p["grad_clip"] is None else float(p["grad_clip"]), description=self.name,
        )
        self.net_ = net.eval()
        self.history_ = history.as_dict()
        self.history_["train_fit"] = self._train_fit(train_g)
        self.net_.cpu()

    @torch.no_grad()
    def _train_fit(self, graphs: list[Any]) -> dict[str, float]:
        """Training-slide MSE of the fitted network next to the mean predictor's (training scale)."""
        assert self.net_ is not None
        ys = [g[TARGET].y.double() for g in graphs]
        mean = torch.cat(ys).mean(0)
        sq_model = sum(float(((self.net_(g).double() - y) ** 2).sum()) for g, y in zip(graphs, ys))
        sq_mean = sum(float(((mean - y) ** 2).sum()) for y in ys)
        n = sum(y.numel() for y in ys)
        return {"mse_model": sq_model / n, "mse_mean_predictor": sq_mean / n}

    # -- prediction --------------------------------------------------------------------------
    def graph(self, slide: Any) -> Any:
        """The exemplar graph a slide is predicted from (``reference.rows``: its bank rows)."""
        self._check_ready()
        x = self._features(slide)
        return self._graph(meta(slide).slide_id, self._coords(slide), x, self._exclusions(slide))

    @torch.no_grad()
    def predict(self, slide: Any) -> np.ndarray:
        """Predicted expression ``(n_spots, n_genes)`` on the evaluation scale."""
        self._check_ready()
        assert self.net_ is not None
        out = self.net_.eval()(self.graph(slide)).float().numpy()
        return self.to_eval_scale(out)

    # -- persistence -------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        self._check_ready()
        assert self.net_ is not None and self.bank_ is not None
        return {**module_state(self.net_, "model."), **self.bank_.state_arrays("bank.")}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        net = self._make_net(int(self._net_spec["feature_dim"]), int(self._net_spec["n_genes"]))
        load_module_state(net, state, "model.")
        self.net_ = net.eval()
        self.bank_ = ReferenceBank.from_state(state, self._bank_meta, "bank.")


__all__ = ["EDGE_TYPES", "GRAPH_DEFAULTS", "ExemplarGraphMethod", "ExemplarGraphNet", "graph_inputs"]
