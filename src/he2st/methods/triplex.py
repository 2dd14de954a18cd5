"""TRIPLEX: target, neighbour and global views of a spot, fused by cross-attention (Chung et al., CVPR 2024)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from he2st.data.slide import make_slide, meta
from he2st.errors import He2stInputError
from he2st.methods.base import FIELD_OF_VIEW_DEFAULTS, Capabilities
from he2st.methods.families.slide import SlideBatch, SlideData, SlideRegressor
from he2st.methods.nn.attention import MultiHeadAttention, TransformerBlock
from he2st.methods.nn.inputs import check_encoder_inputs, encoder_inputs
from he2st.methods.nn.position import RelativeGridBias, SpotGridConv
from he2st.methods.registry import register_method

__all__ = ["TRIPLEX", "TriplexNet", "neighbor_cells", "triplex_loss"]

VIEWS = ("target", "neighbor", "global")
TARGET_INPUTS = ("tokens", "pooled")
SCHEDULERS = ("none", "step", "cosine")

#: Logit given to masked neighbour cells (the code fills with ``finfo(float16).min``).
MASK_LOGIT = float(torch.finfo(torch.float16).min)

# Spots per forward pass of the target, neighbour and fusion encoders at prediction
# (the code's predict_step splits slides into chunks of 512 spots).
_PREDICT_CHUNK = 512


def neighbor_cells(xy: np.ndarray, step: float, n: int, image_wh: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the ``n x n`` neighbour cells around each spot and which lie inside the image.

    Cells are ``step`` pixels apart (one patch field of view) and numbered
    row-major from the top left, the spot's own cell in the middle. A cell is
    kept (mask 1) when its whole ``step x step`` square lies inside the image,
    as the authors' masking table (``make_masking_table``).

    Parameters
    ----------
    xy
        ``(n_spots, 2)`` spot centres ``(x, y)`` in image pixels.
    step
        Cell side and spacing in image pixels.
    n
        Cells per side (odd; TRIPLEX: 5).
    image_wh
        Image ``(width, height)`` in the same pixels.

    Returns
    -------
    tuple of numpy.ndarray
        Centres ``(n_spots, n * n, 2)`` float64 and mask ``(n_spots, n * n)`` bool.
    """
    offs = (np.arange(n) - n // 2) * float(step)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    cells = np.asarray(xy, dtype=np.float64)[:, None, :] + np.stack([dx.ravel(), dy.ravel()], axis=1)[None]
    half = float(step) / 2
    wh = np.asarray(image_wh, dtype=np.float64)
    inside = ((cells - half) >= 0).all(axis=-1) & ((cells + half) <= wh).all(axis=-1)
    return cells, inside


def triplex_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, alpha: float) -> torch.Tensor:
    """TRIPLEX's training loss: fusion MSE plus, per branch, supervision and distillation from the fusion.

    ``MSE(F, y) + sum_b [(1 - alpha) MSE(b, y) + alpha MSE(F, b)]`` over the
    branch predictions ``b`` present in ``outputs`` (``"target"``,
    ``"neighbor"``, ``"global"``); ``F`` is ``outputs["fusion"]``. As in the
    code, the distillation term is not detached: it also pulls the fusion
    towards each branch.

    Parameters
    ----------
    outputs
        Predictions ``(B, n_genes)`` by name; ``"fusion"`` is required.
    target
        ``(B, n_genes)`` expression.
    alpha
        Weight of distillation against supervision of each branch (the code's 0.3;
        0 turns distillation off).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    fusion = outputs["fusion"]
    loss = F.mse_loss(fusion, target)
    for name in VIEWS:
        if name in outputs:
            loss = loss + (1 - alpha) * F.mse_loss(outputs[name], target) + alpha * F.mse_loss(fusion, outputs[name])
    return loss


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention block whose one LayerNorm normalises both queries and context (as the code)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dim // heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        q = q + self.attn(self.norm1(q), self.norm1(kv), bias=bias)
        return q + self.mlp(self.norm2(q))


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(dim, heads, dim // heads, int(dim * mlp_ratio), dropout=dropout, fused=True) for _ in range(depth)
    )


class TriplexNet(nn.Module):
    """TRIPLEX's network on frozen encoder outputs.

    Target encoder (TEM): the spot's tokens, projected to ``emb_dim``.
    Neighbour encoder (NEM): the ``n x n`` neighbour-cell features through
    Transformer blocks with learnt relative-offset attention biases and a key
    mask for cells outside the image, then LayerNorm. Global encoder (GEM):
    every spot of the slide through one Transformer block, the APEG (a
    depthwise convolution on the spot array, :class:`SpotGridConv`),
    ``global_depth - 1`` more blocks and LayerNorm. Fusion: the spot's global
    token queries the target tokens and (separately, with the same weights)
    the neighbour tokens through cross-attention blocks; the two results are
    summed and normalised. Four linear heads: fusion, target (mean token),
    neighbour (mean token), global.

    Parameters
    ----------
    in_dim
        Width of the encoder outputs.
    n_genes
        Genes predicted.
    views
        Views used (subset of ``("target", "neighbor", "global")``).
    emb_dim
        Token width inside the model (inputs are projected when ``in_dim`` differs).
    depths, heads, mlp_ratios, dropouts
        ``{"fusion", "global", "neighbor"}`` -> value.
    kernel_size
        APEG kernel side.
    n_neighbors
        Neighbour cells per side.
    """

    def __init__(self, in_dim: int, n_genes: int, views: tuple[str, ...], emb_dim: int, depths: dict[str, int],
                 heads: dict[str, int], mlp_ratios: dict[str, float], dropouts: dict[str, float], kernel_size: int,
                 n_neighbors: int) -> None:
        super().__init__()
        self.views = tuple(v for v in VIEWS if v in views)
        self.n_neighbors = int(n_neighbors)

        def proj() -> nn.Module:
            return nn.Identity() if in_dim == emb_dim else nn.Linear(in_dim, emb_dim)

        if "target" in self.views:
            self.target_proj = proj()
            self.fc_target = nn.Linear(emb_dim, n_genes)
        if "neighbor" in self.views:
            self.neighbor_proj = proj()
            self.neighbor_blocks = _blocks(emb_dim, depths["neighbor"], heads["neighbor"], mlp_ratios["neighbor"],
                                           dropouts["neighbor"])
            self.neighbor_bias = nn.ModuleList(
                RelativeGridBias(n_neighbors, n_neighbors, heads["neighbor"]) for _ in range(depths["neighbor"])
            )
            self.neighbor_norm = nn.LayerNorm(emb_dim)
            self.fc_neighbor = nn.Linear(emb_dim, n_genes)
        if "global" in self.views:
            self.global_proj = proj()
            self.global_first = _blocks(emb_dim, 1, heads["global"], mlp_ratios["global"], dropouts["global"])[0]
            self.apeg = SpotGridConv(emb_dim, kernel_size)
            self.global_rest = _blocks(emb_dim, depths["global"] - 1, heads["global"], mlp_ratios["global"],
                                       dropouts["global"])
            self.global_norm = nn.LayerNorm(emb_dim)
            self.fc_global = nn.Linear(emb_dim, n_genes)
        self.fusion_blocks = nn.ModuleList(
            _CrossBlock(emb_dim, heads["fusion"], int(emb_dim * mlp_ratios["fusion"]), dropouts["fusion"])
            for _ in range(depths["fusion"])
        )
        self.fusion_norm = nn.LayerNorm(emb_dim)
        self.fc = nn.Linear(emb_dim, n_genes)

    def heads(self) -> list[nn.Linear]:
        """The gene heads (fusion first).

        Returns
        -------
        list of torch.nn.Linear
            ``fc`` and the heads of the views present.
        """
        return [self.fc] + [getattr(self, f"fc_{v}") for v in self.views]

    def global_tokens(self, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """GEM output ``(N, emb_dim)`` for every spot of a slide (or window).

        Parameters
        ----------
        features
            ``(N, in_dim)`` pooled features of the slide's spots.
        grid
            ``(N, 2)`` integer array coordinates ``(col, row)``.

        Returns
        -------
        torch.Tensor
            Global tokens, one per spot.
        """
        x = self.global_proj(features.float()).unsqueeze(0)
        x = self.global_first(x)
        x = self.apeg(x, grid)
        for block in self.global_rest:
            x = block(x)
        return self.global_norm(x)[0]

    def forward(self, target: torch.Tensor, neighbors: torch.Tensor, mask: torch.Tensor,
                global_tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Predictions of the fusion and of each view for a batch of spots.

        Parameters
        ----------
        target
            ``(B, T, in_dim)`` target tokens.
        neighbors
            ``(B, n * n, in_dim)`` neighbour-cell features.
        mask
            ``(B, n * n)`` bool, True for cells inside the image.
        global_tokens
            ``(B, emb_dim)`` GEM outputs of the batch's spots (None without the global view).

        Returns
        -------
        dict
            ``"fusion"`` and one entry per view, each ``(B, n_genes)``.
        """
        out: dict[str, torch.Tensor] = {}
        pooled: list[torch.Tensor] = []
        t_tok = n_tok = key_bias = None
        if "target" in self.views:
            t_tok = self.target_proj(target.float())
            t_mean = t_tok.mean(1)
            out["target"] = self.fc_target(t_mean)
            pooled.append(t_mean)
        if "neighbor" in self.views:
            key_bias = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask.bool(), MASK_LOGIT)[:, None, None, :]
            n_tok = self.neighbor_proj(neighbors.float())
            for block, rel in zip(self.neighbor_blocks, self.neighbor_bias):
                n_tok = block(n_tok, bias=rel().unsqueeze(0) + key_bias)
            n_tok = self.neighbor_norm(n_tok)
            n_mean = n_tok.mean(1)
            out["neighbor"] = self.fc_neighbor(n_mean)
            pooled.append(n_mean)
        if "global" in self.views:
            assert global_tokens is not None
            out["global"] = self.fc_global(global_tokens)
            query = global_tokens.unsqueeze(1)
        else:
            # he2st's choice for the ablations without GEM: the mean of the other views' pooled tokens.
            query = torch.stack(pooled).mean(0).unsqueeze(1)
        parts = []
        for kv, bias in ((t_tok, None), (n_tok, key_bias)):
            if kv is None:
                continue
            q = query
            for block in self.fusion_blocks:
                q = block(q, kv, bias)
            parts.append(q)
        fused = torch.stack(parts).sum(0) if parts else query
        out["fusion"] = self.fc(self.fusion_norm(fused[:, 0]))
        return out


@dataclass(frozen=True)
class _Chunk:
    """A training step: the spots ``rows`` (positions in ``context``) of the slide or window ``context``."""

    context: np.ndarray
    rows: np.ndarray


@register_method("triplex")
class TRIPLEX(SlideRegressor):
    """TRIPLEX: multi-resolution (target, neighbour, global) features fused by cross-attention.

    Chung Y., Ha J. H., Im K. C., Lee J. S., "Accurate Spatial Gene
    Expression Prediction by Integrating Multi-Resolution Features", CVPR
    2024; the authors' code ``NEXGEM/TRIPLEX`` (``models/TRIPLEX.py``,
    ``models/module.py``, ``datasets/st_data.py``, ``config/her2st/TRIPLEX.yaml``,
    April 2024 release). Per spot:

    - target view: the spot's 224 px patch as the 7 x 7 cells of a ResNet18's
      last feature map (49 tokens of 512);
    - neighbour view: the 5 x 5 grid of 224 px patches centred on the spot
      (a 1120 px square), each encoded to one feature; cells outside the
      image are masked;
    - global view: the pooled features of every spot of the slide, with the
      APEG, a depthwise 3 x 3 convolution on the spot array
      (:class:`~he2st.methods.nn.position.SpotGridConv`);
    - network and loss: :class:`TriplexNet`, :func:`triplex_loss` (alpha 0.3).

    he2st runs TRIPLEX on **frozen** encoder outputs (``mode="frozen"``, the
    only mode): target tokens (``get_tokens``), neighbour-cell features and
    global features all come from the feature cache, so it trains on a CPU.
    The code fine-tunes the target ResNet18 (neighbour and global features are
    frozen there too). Every difference is listed in ``docs/fidelity.md#triplex``.

    Ablation switches: ``views`` (any non-empty subset of ``target``,
    ``neighbor``, ``global``; without ``global`` the fusion query is the mean
    of the other views' pooled tokens), ``distill`` (False drops the
    distillation terms, i.e. ``alpha = 0``), ``target_input="pooled"`` (one
    pooled feature instead of the 49 tokens; needed for encoders without
    tokens such as ``color_stats``).

    Defaults
    --------
    Her2ST configuration of the code (``config/her2st/TRIPLEX.yaml``):
    normalization="cpm_log1p", train_normalization=None (= normalization),
    seed=0, encoder="resnet18", weights="imagenet" (the paper's ResNet18 is
    Ciga et al.'s self-supervised "tenpercent" checkpoint; pass it converted
    to a plain state dict as ``weights=<path>``), mode="frozen",
    target_input="tokens", patch_px=224 (``radius: 224``), patch_um=None,
    n_neighbors=5 (``num_neighbors``), views=["target", "neighbor",
    "global"], distill=True, alpha=0.3 (``TRIPLEX.py``: ``self.alpha``),
    emb_dim=512, fusion_depth=1 (``depth1``), global_depth=5 (``depth2``),
    neighbor_depth=4 (``depth3``), fusion_heads=4, global_heads=8,
    neighbor_heads=4, fusion_mlp_ratio=4.0, global_mlp_ratio=4.0,
    neighbor_mlp_ratio=4.0, fusion_dropout=0.4, global_dropout=0.3,
    neighbor_dropout=0.3, kernel_size=3, batch_size=128, epochs=200,
    lr=1e-4, optimizer="adam", weight_decay=0.0, scheduler="step",
    lr_step=50, lr_gamma=0.9 (``StepLR(step_size=50, gamma=0.9)``),
    lr_min=0.0, grad_clip=None, patience=None, augment="none",
    window_px=None (whole slides, as the code), window_min_spots=1000,
    window_overlap=0.5, device="auto". The code's other configurations:
    ST-Net data depths 3/3/4, heads 16/8/8, MLP ratios 4/2/4, dropouts
    0.4/0.1/0.3; skin data depths 2/2/4, heads 8/16/16, MLP ratios 4/1/1,
    dropouts 0.1/0.1/0.3 (fusion/global/neighbour).

    Examples
    --------
    >>> m = he2st.methods.create_method("triplex", encoder="efficientnet_lite0", weights="imagenet", epochs=20)
    >>> ablation = he2st.methods.create_method("triplex", views=["target", "global"], distill=False)
    """

    paper: ClassVar[str] = "Chung et al., CVPR 2024 (TRIPLEX)"
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_tokens=True, needs_positions=True, needs_whole_slides=True, frozen_features=True, finetune=False
    )
    defaults: ClassVar[dict[str, Any]] = {
        "encoder": "resnet18",
        "weights": "imagenet",
        "mode": "frozen",
        "target_input": "tokens",
        "patch_px": 224,
        "n_neighbors": 5,
        "views": list(VIEWS),
        "distill": True,
        "alpha": 0.3,
        "emb_dim": 512,
        "fusion_depth": 1,
        "global_depth": 5,
        "neighbor_depth": 4,
        "fusion_heads": 4,
        "global_heads": 8,
        "neighbor_heads": 4,
        "fusion_mlp_ratio": 4.0,
        "global_mlp_ratio": 4.0,
        "neighbor_mlp_ratio": 4.0,
        "fusion_dropout": 0.4,
        "global_dropout": 0.3,
        "neighbor_dropout": 0.3,
        "kernel_size": 3,
        "batch_size": 128,
        "epochs": 200,
        "lr": 1e-4,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "scheduler": "step",
        "lr_step": 50,
        "lr_gamma": 0.9,
        "lr_min": 0.0,
        "grad_clip": None,
        "patience": None,
        "augment": "none",
        "window_px": None,
        "window_min_spots": 1000,
        "window_overlap": 0.5,
        "device": "auto",
        **FIELD_OF_VIEW_DEFAULTS,
    }

    # -- parameters -------------------------------------------------------------------
    def _check_params(self) -> None:
        p = self.params

        def bad(msg: str) -> He2stInputError:
            return He2stInputError(f"method 'triplex': {msg}")

        if p["mode"] != "frozen":
            raise bad(f"only mode='frozen' is implemented (cached encoder outputs), got {p['mode']!r}")
        views = list(p["views"]) if isinstance(p["views"], (list, tuple)) else None
        if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
            raise bad(f"views must be a non-empty list of distinct names from {VIEWS}, got {p['views']!r}")
        if p["target_input"] not in TARGET_INPUTS:
            raise bad(f"target_input must be one of {TARGET_INPUTS}, got {p['target_input']!r}")
        if not 0.0 <= float(p["alpha"]) <= 1.0:
            raise bad(f"alpha must be in [0, 1], got {p['alpha']!r}")
        n = int(p["n_neighbors"])
        if n < 1 or n % 2 == 0:
            raise bad(f"n_neighbors must be a positive odd number (cells per side), got {p['n_neighbors']!r}")
        if int(p["kernel_size"]) < 1 or int(p["kernel_size"]) % 2 == 0:
            raise bad(f"kernel_size must be a positive odd number, got {p['kernel_size']!r}")
        for part in ("fusion", "global", "neighbor"):
            heads = int(p[f"{part}_heads"])
            if heads < 1 or int(p["emb_dim"]) % heads:
                raise bad(f"emb_dim ({p['emb_dim']}) must be a multiple of {part}_heads ({p[f'{part}_heads']})")
            if int(p[f"{part}_depth"]) < 1:
                raise bad(f"{part}_depth must be >= 1, got {p[f'{part}_depth']!r}")
            if not 0.0 <= float(p[f"{part}_dropout"]) < 1.0:
                raise bad(f"{part}_dropout must be in [0, 1), got {p[f'{part}_dropout']!r}")
        if p["augment"] not in (None, "none"):
            raise bad("augment must be 'none': the inputs are cached frozen features")
        if p["scheduler"] not in SCHEDULERS:
            raise bad(f"scheduler must be one of {SCHEDULERS}, got {p['scheduler']!r}")
        if p["window_px"] is not None and not float(p["window_px"]) > 0:
            raise bad(f"window_px must be positive or None, got {p['window_px']!r}")
        if not 0 <= float(p["window_overlap"]) < 1:
            raise bad(f"window_overlap must be in [0, 1), got {p['window_overlap']!r}")
        for key in ("epochs", "patch_px", "batch_size", "emb_dim"):
            if int(p[key]) < 1:
                raise bad(f"{key} must be >= 1, got {p[key]!r}")

    @property
    def views(self) -> tuple[str, ...]:
        """The views used, in the canonical order."""
        return tuple(v for v in VIEWS if v in self.params["views"])

    # -- inputs -----------------------------------------------------------------------
    def _encoder_kw(self, slide: Any) -> dict[str, Any]:
        target_mpp = self.read_mpp(slide)
        return {} if target_mpp is None else {"target_mpp": float(target_mpp)}

    def _global_features(self, slide: Any) -> np.ndarray:
        """Pooled frozen features ``(n, D)`` of the spots' own patches (the global view's input)."""
        p = self.params
        return encoder_inputs(slide, p["encoder"], p["weights"], int(p["patch_px"]), target_mpp=self.read_mpp(slide))

    def _slide_inputs(self, slide: Any, train: bool) -> np.ndarray:
        """Target tokens ``(n, T, D)`` float16 (``target_input="pooled"``: ``T = 1``)."""
        p = self.params
        if p["target_input"] == "pooled":
            return self._global_features(slide)[:, None, :].astype(np.float16)
        tokens = encoder_inputs(slide, p["encoder"], p["weights"], int(p["patch_px"]), tokens=True, dtype=None,
                                target_mpp=self.read_mpp(slide))
        return np.asarray(tokens, dtype=np.float16)

    def neighbor_inputs(self, slide: Any) -> tuple[np.ndarray, np.ndarray]:
        """Frozen features of the neighbour cells of every spot, and their mask.

        The cells are patches of the model's field of view centred on the
        ``n_neighbors x n_neighbors`` grid around each spot (spacing: one patch),
        encoded as the spots of an image-only copy of the slide (so cached by
        the feature cache like any slide, streamed without a patch cache).

        Parameters
        ----------
        slide
            A slide AnnData with an image.

        Returns
        -------
        tuple of numpy.ndarray
            Features ``(n_spots, n * n, D)`` float16 and mask ``(n_spots, n * n)`` bool.
        """
        from he2st.encoders import get_features
        from he2st.image import image_size

        p = self.params
        m = meta(slide)
        n = int(p["n_neighbors"])
        size = int(p["patch_px"])
        kw = self._encoder_kw(slide)
        step = float(size) if not kw else size * kw["target_mpp"] / float(m.mpp)
        xy = np.asarray(slide.obsm["spatial"], dtype=np.float64)
        cells, mask = neighbor_cells(xy, step, n, image_size(m.image_path))
        ids = [f"{o}#{j}" for o in map(str, slide.obs_names) for j in range(n * n)]
        cell_slide = make_slide(
            None, ids, [], cells.reshape(-1, 2), slide_id=f"{m.slide_id}#triplex-neighbors", patient=m.patient,
            image_path=m.image_path, spot_diameter_px=m.spot_diameter_px, mpp=m.mpp, scale=m.scale, counts=False,
            mpp_source=m.mpp_source,
        )
        feats = get_features(cell_slide, encoder=p["encoder"], weights=p["weights"], patch_px=size, stream=True, **kw)
        feats = check_encoder_inputs(np.asarray(feats, dtype=np.float32), cell_slide, p["encoder"])
        return feats.reshape(slide.n_obs, n * n, -1).astype(np.float16), mask

    def slide_data(self, slide: Any, train: bool = False) -> SlideData:
        """The slide's arrays: target tokens as ``inputs``; global features and neighbour cells in ``extras``.

        Parameters
        ----------
        slide
            Slide AnnData (with counts for the panel when ``train``).
        train
            Also fill the targets.

        Returns
        -------
        SlideData
            Row-aligned arrays of the slide's spots; the views a model does not use are left out.
        """
        data = super().slide_data(slide, train)
        views = self.views
        if "global" in views:
            data.extras["global"] = self._global_features(slide).astype(np.float32)
        if "neighbor" in views:
            data.extras["neighbors"], data.extras["mask"] = self.neighbor_inputs(slide)
        return data

    # -- batches ----------------------------------------------------------------------
    def _units(self, data: SlideData) -> list[Any]:
        """Training steps of a slide: ``batch_size`` spots at a time, the global view over the slide (or window)."""
        size = int(self.params["batch_size"])
        rng = np.random.default_rng([int(self.params["seed"]), zlib.crc32(data.slide_id.encode())])
        out: list[Any] = []
        for context in super()._units(data):
            perm = rng.permutation(len(context))
            out += [_Chunk(context, np.sort(perm[s : s + size])) for s in range(0, len(context), size)]
        return out

    def make_batch(self, data: SlideData, idx: Any = None, device: torch.device | str = "cpu") -> SlideBatch:
        """Tensors of a training chunk, or of the spots ``idx`` (all when None) of a slide.

        Parameters
        ----------
        data
            The slide's arrays (:meth:`slide_data`).
        idx
            A training chunk (from :meth:`_units`), spot indices (a window), or None.
        device
            Device the tensors are moved to.

        Returns
        -------
        SlideBatch
            ``inputs``, ``targets`` and the per-spot views of the chunk's spots;
            ``extras["global"]`` and ``positions`` (array grid) of the whole
            context; ``extras["rows"]`` the chunk's positions in the context.
        """
        if isinstance(idx, _Chunk):
            context, rows = np.asarray(idx.context, dtype=np.int64), np.asarray(idx.rows, dtype=np.int64)
        else:
            context = np.arange(data.n) if idx is None else np.asarray(idx, dtype=np.int64)
            rows = np.arange(len(context))
        spots = context[rows]

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        extras = {"rows": t(rows)}
        for key, value in data.extras.items():
            extras[key] = t(value[context] if key == "global" else value[spots])
        return SlideBatch(
            slide_id=data.slide_id,
            inputs=t(data.inputs[spots]),
            positions=t(data.grid[context]),
            edge_index=torch.zeros(2, 0, dtype=torch.long, device=device),
            neighbors=None,
            targets=None if data.targets is None else t(data.targets[spots]),
            extras=extras,
        )

    # -- model ------------------------------------------------------------------------
    def _setup(self, train_slides: list[Any]) -> None:
        self.dims_["feature_dim"] = int(self._global_features(train_slides[0]).shape[1])

    def _build_model(self) -> nn.Module:
        p = self.params
        parts = ("fusion", "global", "neighbor")
        return TriplexNet(
            int(self.dims_["feature_dim"]), int(self.dims_["n_genes"]), self.views, int(p["emb_dim"]),
            depths={k: int(p[f"{k}_depth"]) for k in parts},
            heads={k: int(p[f"{k}_heads"]) for k in parts},
            mlp_ratios={k: float(p[f"{k}_mlp_ratio"]) for k in parts},
            dropouts={k: float(p[f"{k}_dropout"]) for k in parts},
            kernel_size=int(p["kernel_size"]), n_neighbors=int(p["n_neighbors"]),
        )

    def _init_model(self, model: nn.Module, train: list[SlideData]) -> None:
        # Every gene head starts from the mean predictor (the family's convention).
        mean = torch.from_numpy(np.concatenate([d.targets for d in train]).mean(axis=0)).float()
        with torch.no_grad():
            for head in model.heads():
                head.bias.copy_(mean)

    def _outputs(self, model: TriplexNet, batch: SlideBatch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model outputs for the spots ``rows`` of ``batch`` (indices into its ``inputs``)."""
        g = None
        if "global" in model.views:
            tokens = model.global_tokens(batch.extras["global"], batch.positions)
            g = tokens[batch.extras["rows"][rows]]
        empty = batch.inputs.new_zeros(len(rows), 1, 1)
        nb = batch.extras.get("neighbors")
        mask = batch.extras.get("mask")
        return model(
            batch.inputs[rows],
            empty if nb is None else nb[rows],
            torch.ones(len(rows), 1, dtype=torch.bool, device=empty.device) if mask is None else mask[rows],
            g,
        )

    def _loss(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        assert batch.targets is not None and isinstance(model, TriplexNet)
        out = self._outputs(model, batch, torch.arange(len(batch.inputs), device=batch.inputs.device))
        alpha = float(self.params["alpha"]) if self.params["distill"] else 0.0
        return triplex_loss(out, batch.targets, alpha)

    def _forward(self, model: nn.Module, batch: SlideBatch) -> torch.Tensor:
        assert isinstance(model, TriplexNet)
        n = len(batch.inputs)
        g_all = None
        if "global" in model.views:
            g_all = model.global_tokens(batch.extras["global"], batch.positions)[batch.extras["rows"]]
        preds = []
        for s in range(0, n, _PREDICT_CHUNK):
            r = torch.arange(s, min(n, s + _PREDICT_CHUNK), device=batch.inputs.device)
            nb, mask = batch.extras.get("neighbors"), batch.extras.get("mask")
            preds.append(model(
                batch.inputs[r],
                batch.inputs.new_zeros(len(r), 1, 1) if nb is None else nb[r],
                torch.ones(len(r), 1, dtype=torch.bool, device=r.device) if mask is None else mask[r],
                None if g_all is None else g_all[r],
            )["fusion"])
        return torch.cat(preds)

    def predict_views(self, slide: Any) -> dict[str, np.ndarray]:
        """Predictions of the fusion and of every view's own head, on the evaluation scale.

        Parameters
        ----------
        slide
            Slide AnnData (an image-only slide works).

        Returns
        -------
        dict
            ``"fusion"`` and one entry per view, each ``(n_spots, n_genes)`` float32.
        """
        model = self._require_model()
        model.eval()
        data = self.slide_data(slide, train=False)
        with torch.no_grad():
            batch = self.make_batch(data, None)
            out = self._outputs(model, batch, torch.arange(data.n))  # type: ignore[arg-type]
        return {k: self.to_eval_scale(v.float().numpy()) for k, v in out.items()}
