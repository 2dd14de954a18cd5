"""Slide-level regression: all spots of a slide (or of a window of it) at once.

The shared machinery of HisToGene, Hist2ST and THItoGene (Jiang et al. 2024,
seed paper 002: "The transformer-based methods treat all spots on a single
tissue section as an independent training sample"). A
:class:`SlideRegressor` subclass says how its network is built, what its loss
is, and how it predicts; the data assembly (spot patches, learnable-position
indices, the spot graph, local-attention neighbour lists), windowing,
training (:func:`he2st.methods.nn.train.fit_module`, one slide or window per
optimiser step) and persistence live here once.

Scaling to Visium-size slides
-----------------------------
``window_px`` / ``window_min_spots`` / ``window_overlap``
    A slide with more than ``window_min_spots`` spots is cut into square
    windows of ``window_px`` full-resolution pixels (default 4000, the
    benchmark paper's workaround for Visium); every window is one training
    sample (a partition of the slide: each spot in exactly one). Prediction
    uses windows overlapping by ``window_overlap`` whose outputs are blended
    with tapered weights summing to 1 per spot
    (:mod:`he2st.methods.nn.windows`). ``window_px=None`` always uses whole slides.
    The default ``window_min_spots=1000`` keeps ST slides (<= ~700 spots)
    whole, as the original papers trained them, and windows Visium slides
    (1300-4900 spots), as the benchmark did.
``attention``
    ``"full"`` (the papers': every spot attends to every spot of the slide or
    window), ``"knn"`` (each spot attends to its ``attention_k`` nearest
    spots) or ``"radius"`` (to the spots within ``attention_radius`` pixels);
    see :mod:`he2st.methods.nn.transformer`.

What each option buys (``benchmarks/bench_slide_memory.py``: HisToGene at
paper size, 5,000 spots, one training epoch on this 2-core CPU): global
attention materialising the ``n x n`` matrix, as the published code does,
passes 8 GB within 30 s; ``"full"`` attention without that matrix peaks at
~4.4 GB (memory is then dominated by per-layer activations and the optimiser
state, not by attention); windows cut the peak to ~2.3 GB; local attention
keeps ~4.8 GB at this size but makes attention ``O(n k)`` instead of ``O(n^2)``
in time, which matters for larger slides and sub-spot prediction.

Spot graph and positions
------------------------
The graph is the 4-nearest-neighbour graph on the integer array coordinates
``(array_col, array_row)``, pruned to neighbours at most 2 grid units away
(Hist2ST's ``prune="Grid"``), built per slide or window with
:func:`he2st.methods.nn.graphs.knn_graph`. Learnable x and y position
embeddings are indexed by the array coordinates relative to the slide or
window (:func:`he2st.methods.nn.graphs.grid_positions`): every window is a
sample of its own, as in the benchmark paper, and a 4000 px window spans far
fewer than the tables' 64 grid steps, so positions stay distinct where a whole
Visium slide (128 x 78 steps, more spots than 64 x 64 cells) could not.

Physical scale
--------------
``patch_um`` (default None: ``patch_px`` times the training slides' median
microns per pixel) is the field of view of a spot's patch; every slide's
patches are read at ``patch_um_ / patch_px`` microns per pixel
(:meth:`he2st.methods.base.Method.read_mpp`). Spot coordinates are expressed
in the pixel frame of the training slides (multiplied by ``slide mpp /
train_mpp_``, :meth:`he2st.methods.base.Method.pixel_scale`), so ``window_px``,
``attention_radius`` and k-nearest attention mean the same microns on a slide
scanned at another resolution. Prediction needs only the image and the spot
positions: an image-only slide (no genes) is predicted like any other.

Targets
-------
The network trains on ``train_normalization`` (the paper's scale; for
HisToGene, Hist2ST and THItoGene ``hist2st_lognorm``) and :meth:`SlideRegressor.predict`
maps its output to ``normalization``, the protocol's common scale, with
:meth:`he2st.methods.base.Method.to_eval_scale` (training constants only).

Initialisation
--------------
The bias of the gene head's last linear layer starts at the mean training
expression, so training starts from the mean predictor. The papers start it
at zero; over their 100-350 epochs the difference vanishes, while on short
CPU budgets it spares the epochs spent learning the mean.

Validation
----------
The papers train a fixed number of epochs and keep the last weights; so does
this class unless ``fit`` gets ``val_slides``, in which case the weights of the
epoch with the lowest validation MSE are kept (early stopping after
``patience`` epochs without improvement when set).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.data.slide import meta
from he2st.errors import He2stInputError
from he2st.methods.base import FIELD_OF_VIEW_DEFAULTS, Capabilities, Method
from he2st.methods.nn.graphs import grid_positions, knn_graph
from he2st.methods.nn.inputs import make_augmenter, to_unit
from he2st.methods.nn.train import (
    default_device,
    fit_module,
    load_module_state,
    module_state,
    schedule_kwargs,
    set_seed,
)
from he2st.methods.nn.transformer import (
    ATTENTION_MODES,
    LocalNeighbors,
    attention_neighbors,
)
from he2st.methods.nn.windows import (
    blend,
    prediction_windows,
    training_windows,
    use_windows,
)

__all__ = ["SLIDE_DEFAULTS", "SlideBatch", "SlideData", "SlideRegressor"]

#: ``pixel_scale`` values of the pixel-input slide methods: the originals' raw 0-255
#: values ("uint8") or pixels divided by 255 ("unit").
PIXEL_SCALES = ("uint8", "unit")

#: Keys every :class:`SlideRegressor` understands; subclasses give their paper's values in ``defaults``.
SLIDE_DEFAULTS: dict[str, Any] = {
    "patch_px": 112,
    "n_pos": 64,
    "pos_init_std": 1.0,
    "epochs": 100,
    "lr": 1e-5,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "grad_clip": None,
    "patience": None,
    "augment": "none",
    "neighbors": 4,
    "graph_max_distance": 2.0,
    "attention": "full",
    "attention_k": 64,
    "attention_radius": None,
    "window_px": 4000.0,
    "window_min_spots": 1000,
    "window_overlap": 0.5,
    "device": "auto",
    **FIELD_OF_VIEW_DEFAULTS,
}


@dataclass
class SlideData:
    """Per-spot arrays of one slide, row-aligned with its spots.

    ``inputs`` are uint8 patches ``(n, S, S, 3)`` or float32 features ``(n, d)``;
    ``extras`` holds method-specific arrays (raw counts, labels, augmented
    views), each with the spots on its first axis.

    Parameters
    ----------
    slide_id
        Identifier of the slide (keys the cache of spot graphs).
    inputs
        ``(n, S, S, 3)`` uint8 patches or ``(n, d)`` float32 features.
    coords
        ``(n, 2)`` float64 spot centres in full-resolution pixels.
    grid
        ``(n, 2)`` int64 array coordinates ``(array_col, array_row)``.
    targets
        ``(n, n_genes)`` float32 expression on the fitted panel and the
        training scale (``train_normalization``; training only, None otherwise).
    extras
        Method-specific per-spot arrays, spots on the first axis.
    """

    slide_id: str
    inputs: np.ndarray
    coords: np.ndarray  # (n, 2) pixel centres
    grid: np.ndarray  # (n, 2) array (col, row)
    targets: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.coords)


@dataclass
class SlideBatch:
    """Torch tensors of one slide or window, ready for a model.

    Parameters
    ----------
    slide_id
        Identifier of the slide.
    inputs
        ``(n, S, S, 3)`` uint8 patches or ``(n, d)`` float32 features.
    positions
        ``(n, 2)`` int64 position indices for the x/y embedding tables
        (:func:`he2st.methods.nn.graphs.grid_positions`).
    edge_index
        ``(2, E)`` int64 k-nearest-neighbour spot graph (row 0 source, row 1
        target) over the batch's spots.
    neighbors
        Attention neighbour lists, or None for full attention.
    targets
        ``(n, n_genes)`` float32 expression, or None when not training.
    extras
        Method-specific per-spot tensors, spots on the first axis.
    """

    slide_id: str
    inputs: torch.Tensor
    positions: torch.Tensor
    edge_index: torch.Tensor
    neighbors: LocalNeighbors | None
    targets: torch.Tensor | None
    extras: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])


class SlideRegressor(Method):
    """Base of the slide-level methods; see the module docstring.

    Subclasses implement :meth:`_build_model`, :meth:`_loss` and
    :meth:`_forward`, and may override :meth:`_setup` (facts learned from the
    training slides before the model is built), :meth:`_slide_inputs` and
    :meth:`_slide_extras`.
    """

    family: ClassVar[str] = "slide"
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_positions=True, needs_whole_slides=True, frozen_features=False, finetune=True
    )
    defaults: ClassVar[dict[str, Any]] = dict(SLIDE_DEFAULTS)
    supports_train_normalization: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._check_params()
        self.model_: nn.Module | None = None
        self.dims_: dict[str, Any] = {}
        self.history_: dict[str, Any] = {}
        self.augmenter: Any = None  # set by fit from ``augment``
        self._structure_cache: dict[tuple[str, bytes], tuple[torch.Tensor, torch.Tensor, LocalNeighbors | None]] = {}

    # -- hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def _build_model(self) -> nn.Module:
        """The network, from ``self.params`` and ``self.dims_``."""

    @abc.abstractmethod
    def _loss(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        """Training loss of one slide or window."""

    @abc.abstractmethod
    def _forward(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        """Predicted expression ``(n, n_genes)`` on the normalised scale (eval mode)."""

    def _transformer_kwargs(self) -> dict[str, Any]:
        """The spot-Transformer settings every slide-level network takes, from ``self.params``."""
        p = self.params
        return {
            "n_genes": int(self.dims_["n_genes"]),
            "n_pos": int(p["n_pos"]),
            "depth": int(p["depth"]),
            "heads": int(p["heads"]),
            "dim_head": int(p["dim_head"]),
            "mlp_dim": None if p["mlp_dim"] is None else int(p["mlp_dim"]),
            "dropout": float(p["dropout"]),
            "attention": str(p["attention"]),
            "pos_init_std": float(p["pos_init_std"]),
        }

    def _val_loss(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        """Validation loss: MSE of the prediction."""
        return torch.mean((self._forward(model, batch) - batch.targets) ** 2)

    def _setup(self, train_slides: list[Any]) -> None:
        """Learn facts from the training slides needed to build the model (into ``self.dims_``)."""

    def _init_model(self, model: nn.Module, train: list[SlideData]) -> None:
        """Initialise a freshly built network from the training data (default: gene-head bias = mean target)."""
        head = getattr(model, "gene_head", None)
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            # Start from the mean predictor (see the module docstring).
            mean = np.concatenate([d.targets for d in train]).mean(axis=0)
            with torch.no_grad():
                head[-1].bias.copy_(torch.from_numpy(mean).float())

    def _slide_inputs(self, slide: Any, train: bool) -> np.ndarray:
        """Per-spot model inputs: uint8 patches ``(n, S, S, 3)`` by default."""
        from he2st.image import extract_patches

        size = int(self.params["patch_px"])
        return extract_patches(slide, size_px=size, target_mpp=self.read_mpp(slide, size)).images

    def _slide_extras(self, slide: Any, train: bool) -> dict[str, np.ndarray]:
        """Extra per-spot arrays needed by the loss (training only)."""
        return {}

    # -- pixels ---------------------------------------------------------------------
    def _scale_pixels(self, x_unit: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the network's input scale.

        ``pixel_scale="uint8"``: the originals' raw 0-255 values; ``"unit"`` (or a
        method without the parameter): unchanged.
        """
        return x_unit * 255.0 if self.params.get("pixel_scale", "unit") == "uint8" else x_unit

    def _pixels(self, x_uint8: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 ``(n, S, S, 3)`` -> float ``(n, 3, S, S)`` on the ``pixel_scale``, augmented when ``train``.

        Augmentation works on [0, 1] images, before the scale is applied.
        """
        x = to_unit(x_uint8)
        if train and self.augmenter is not None:
            x = self.augmenter(x)
        return self._scale_pixels(x)

    # -- checks ---------------------------------------------------------------------
    def _check_params(self) -> None:
        p = self.params
        if "pixel_scale" in p and p["pixel_scale"] not in PIXEL_SCALES:
            raise He2stInputError(f"method {self.name!r}: pixel_scale must be one of {PIXEL_SCALES}, got {p['pixel_scale']!r}")
        if p["attention"] not in ATTENTION_MODES:
            raise He2stInputError(f"method {self.name!r}: attention must be one of {ATTENTION_MODES}, got {p['attention']!r}")
        if p["attention"] == "radius" and not (p["attention_radius"] and float(p["attention_radius"]) > 0):
            raise He2stInputError(f"method {self.name!r}: attention='radius' needs attention_radius > 0 (pixels)")
        if p["window_px"] is not None and not float(p["window_px"]) > 0:
            raise He2stInputError(f"method {self.name!r}: window_px must be positive or None, got {p['window_px']!r}")
        if not 0 <= float(p["window_overlap"]) < 1:
            raise He2stInputError(f"method {self.name!r}: window_overlap must be in [0, 1), got {p['window_overlap']!r}")
        for key in ("epochs", "n_pos", "patch_px"):
            if int(p[key]) < 1:
                raise He2stInputError(f"method {self.name!r}: {key} must be >= 1, got {p[key]!r}")

    # -- data -------------------------------------------------------------------------
    def slide_data(self, slide: Any, train: bool = False) -> SlideData:
        """Assemble the arrays of one slide (targets and extras only when ``train``).

        Parameters
        ----------
        slide
            Slide (AnnData) with ``obs["array_col"]``, ``obs["array_row"]`` and
            ``obsm["spatial"]``; with counts for the panel when ``train``.
        train
            Also fill ``targets`` (normalised expression) and ``extras``.

        Returns
        -------
        SlideData
            The slide's per-spot arrays; ``coords`` in the training pixel frame
            (:meth:`he2st.methods.base.Method.pixel_scale`).
        """
        m = meta(slide)
        self.check_servable(slide)
        grid = np.stack(
            [np.asarray(slide.obs["array_col"], dtype=np.int64), np.asarray(slide.obs["array_row"], dtype=np.int64)], axis=1
        )
        inputs = self._slide_inputs(slide, train)
        if len(inputs) != slide.n_obs:
            raise RuntimeError(f"slide {m.slide_id!r}: {len(inputs)} inputs for {slide.n_obs} spots")
        return SlideData(
            slide_id=m.slide_id,
            inputs=inputs,
            coords=np.asarray(slide.obsm["spatial"], dtype=np.float64) * self.pixel_scale(slide),
            grid=grid,
            targets=np.asarray(self.train_targets(slide), dtype=np.float32) if train else None,
            extras=self._slide_extras(slide, train) if train else {},
        )

    def _structure(self, data: SlideData, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, LocalNeighbors | None]:
        """Positions, spot graph and attention neighbours of a subset of a slide (cached: windows repeat every epoch)."""
        key = (data.slide_id, np.ascontiguousarray(idx).tobytes())
        hit = self._structure_cache.get(key)
        if hit is not None:
            return hit
        p = self.params
        edges = knn_graph(
            data.grid[idx].astype(np.float64),
            int(p["neighbors"]),
            max_distance=None if p["graph_max_distance"] is None else float(p["graph_max_distance"]),
        )
        nbrs = attention_neighbors(
            data.coords[idx],
            p["attention"],
            k=int(p["attention_k"]),
            radius=None if p["attention_radius"] is None else float(p["attention_radius"]),
        )
        positions = torch.from_numpy(grid_positions(data.grid[idx], int(p["n_pos"])))
        out = (positions, torch.from_numpy(edges), nbrs)
        if len(self._structure_cache) < 4096:
            self._structure_cache[key] = out
        return out

    def make_batch(self, data: SlideData, idx: np.ndarray | None = None, device: torch.device | str = "cpu") -> SlideBatch:
        """Tensors of the spots ``idx`` (all when None) of a slide.

        Parameters
        ----------
        data
            The slide's arrays (:meth:`slide_data`).
        idx
            Indices of the spots to include (a window), or None for all.
        device
            Device the tensors are moved to.

        Returns
        -------
        SlideBatch
            Inputs, targets and extras of the spots ``idx``, with their
            positions, spot graph and attention neighbours computed on that
            subset (indices local to it).
        """
        if idx is None:
            idx = np.arange(data.n)
        idx = np.asarray(idx, dtype=np.int64)
        positions, edges, nbrs = self._structure(data, idx)
        t = torch.from_numpy
        return SlideBatch(
            slide_id=data.slide_id,
            inputs=t(np.ascontiguousarray(data.inputs[idx])).to(device),
            positions=positions.to(device),
            edge_index=edges.to(device),
            neighbors=None if nbrs is None else nbrs.to(device),
            targets=None if data.targets is None else t(data.targets[idx]).to(device),
            extras={k: t(np.ascontiguousarray(v[idx])).to(device) for k, v in data.extras.items()},
        )

    def _units(self, data: SlideData) -> list[np.ndarray]:
        """Training samples of a slide: the whole slide, or its non-overlapping windows."""
        p = self.params
        if not use_windows(data.n, p["window_px"], int(p["window_min_spots"])):
            return [np.arange(data.n)]
        wins = training_windows(data.coords, float(p["window_px"]))
        # A window holding a single spot (a corner of the tissue) offers no
        # spatial context and breaks batch statistics; it is not trained on.
        big = [w for w in wins if len(w) >= 2]
        return big or wins

    # -- fitting ----------------------------------------------------------------------
    def _fit(self, train_slides: list[Any], val_slides: list[Any] | None) -> None:
        p = self.params
        gen = set_seed(int(p["seed"]))
        device = default_device(p["device"])
        self._structure_cache = {}
        self.augmenter = make_augmenter(p["augment"], seed=int(p["seed"]))
        self.dims_ = {"n_genes": len(self.genes or [])}
        self._setup(train_slides)
        train = [self.slide_data(s, train=True) for s in train_slides]
        units = [(d, u) for d in train for u in self._units(d)]
        val_units = []
        if val_slides:
            val = [self.slide_data(s, train=True) for s in val_slides]
            val_units = [(d, u) for d in val for u in self._units(d)]
        set_seed(int(p["seed"]))
        model = self._build_model()
        self._init_model(model, train)
        model = model.to(device)

        def train_batches(epoch: int) -> Iterator[SlideBatch]:
            for i in torch.randperm(len(units), generator=gen).tolist():
                yield self.make_batch(units[i][0], units[i][1], device)

        def val_batches() -> Iterator[SlideBatch]:
            for d, u in val_units:
                yield self.make_batch(d, u, device)

        history = fit_module(
            model,
            lambda b: self._loss(model, b),
            train_batches,
            epochs=int(p["epochs"]),
            lr=float(p["lr"]),
            optimizer=str(p["optimizer"]),
            weight_decay=float(p["weight_decay"]),
            val_batches=val_batches if val_units else None,
            val_loss_fn=lambda b: self._val_loss(model, b),
            patience=None if p["patience"] is None else int(p["patience"]),
            grad_clip=None if p["grad_clip"] is None else float(p["grad_clip"]),
            # A method with a learning-rate schedule (TRIPLEX's StepLR) declares its keys.
            **(schedule_kwargs(p) if "scheduler" in p else {}),
            description=f"{self.name}",
        )
        self.model_ = model.cpu().eval()
        self.history_ = history.as_dict()
        self.history_["train_fit"] = self._train_fit(train)
        self._structure_cache = {}

    def _train_fit(self, train: list[SlideData]) -> dict[str, float]:
        """Training-section MSE of the fitted model next to the mean predictor's.

        Both on the training scale, averaged over spots and genes of all
        training slides; the mean predictor is the per-gene mean over those
        spots. A model whose MSE does not fall below the mean predictor's on
        the sections it was trained on has not learnt anything (issue 12 asks
        this of HisToGene); it is recorded for every slide method.
        """
        targets = [d.targets for d in train if d.targets is not None]
        if not targets:
            return {}
        mean = np.concatenate(targets).astype(np.float64).mean(axis=0)
        sq_model = sq_mean = 0.0
        n = 0
        with torch.no_grad():
            for d in train:
                if d.targets is None:
                    continue
                y = d.targets.astype(np.float64)
                pred = self._predict_data(d).astype(np.float64)
                sq_model += float(((pred - y) ** 2).sum())
                sq_mean += float(((mean - y) ** 2).sum())
                n += y.size
        return {"mse_model": sq_model / n, "mse_mean_predictor": sq_mean / n}

    # -- prediction ---------------------------------------------------------------------
    def _require_model(self) -> nn.Module:
        self._check_fitted()
        if self.model_ is None:
            raise He2stInputError(f"method {self.name!r} has no trained network: call fit() or load()")
        return self.model_

    @torch.no_grad()
    def _predict_data(self, data: SlideData, fn: Any = None) -> np.ndarray:
        """Run ``fn(model, batch)`` (default :meth:`_forward`) over a slide, windowed and blended if large."""
        model = self._require_model()
        model.eval()
        fn = fn or self._forward
        p = self.params
        device = next(model.parameters()).device
        if not use_windows(data.n, p["window_px"], int(p["window_min_spots"])):
            out = fn(model, self.make_batch(data, None, device)).float().cpu().numpy()
        else:
            wins = prediction_windows(data.coords, float(p["window_px"]), float(p["window_overlap"]))
            preds = [fn(model, self.make_batch(data, w.index, device)).float().cpu().numpy() for w in wins]
            out = blend(data.n, wins, preds)
        self._structure_cache = {}
        return np.asarray(out, dtype=np.float32)

    def predict(self, slide: Any) -> np.ndarray:
        """Predicted expression ``(n_spots, n_genes)`` on the evaluation scale (``normalization``)."""
        self._require_model()
        return self.to_eval_scale(self._predict_data(self.slide_data(slide, train=False)))

    # -- persistence --------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return module_state(self._require_model())

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        model = self._build_model()
        load_module_state(model, state)
        self.model_ = model.eval()

    def get_extra(self) -> dict[str, Any]:
        return {"dims": self.dims_, "history": self.history_}

    def set_extra(self, extra: dict[str, Any]) -> None:
        self.dims_ = dict(extra.get("dims", {}))
        self.history_ = dict(extra.get("history", {}))

