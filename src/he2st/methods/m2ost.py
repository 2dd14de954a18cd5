"""M2OST: many-to-one regression from several image levels of one spot (Wang et al., AAAI 2025)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from he2st.errors import He2stInputError
from he2st.methods.base import Capabilities
from he2st.methods.families.spot import SPOT_DEFAULTS, SpotRegressor
from he2st.methods.nn.multiscale import DeformablePatchEmbedding, MultiLevelBlock
from he2st.methods.registry import register_method

POOLS = ("cls", "mean")


class M2OSTNet(nn.Module):
    """The M2OST network: ``L`` image levels of a spot -> one expression vector.

    Level ``l`` is an ``S x S`` image whose field of view is ``level_scales[l]``
    times the finest one. Its tokens come from ``l + 1`` nested grids, each
    ``g x g`` with ``g = S / token_px``: the whole image in ``token_px``
    patches, and for every finer level ``m < l`` the centred window that
    covers level ``m``'s field, in patches ``token_px * s_m / s_l`` wide. The
    spot's centre therefore gets the finest tokens and the surroundings the
    coarsest. One :class:`DeformablePatchEmbedding` per patch size is shared
    by every level using it; the finest grid comes first in each sequence, a
    shared [CLS] token is prepended and each level adds its own learned
    positions. ``depth`` :class:`MultiLevelBlock` follow; the final LayerNorm
    is shared, and the [CLS] tokens (or token means) of all levels are
    concatenated into ``head``.

    Parameters
    ----------
    head
        Module on the ``L * embed_dim`` concatenation.
    image_px
        Side ``S`` of every level's image.
    token_px
        Patch side of the whole-image grid.
    level_scales
        Fields of view relative to the finest (ascending, the first 1).
    embed_dim
        Token width of each level.
    depth
        Number of blocks.
    heads
        Intra-level attention heads, all levels together (``heads / L`` per level).
    head_dim
        Width of every attention head.
    cross_heads
        Heads of the cross-level attention.
    mlp_dim
        Hidden width of the excitation MLP; the shared token MLP uses ``mlp_dim / L``.
    dropout, emb_dropout
        Dropout in the blocks and on the embedded tokens.
    deform
        Learned offsets of the patches (see :class:`DeformablePatchEmbedding`).
    cross_residual
        Residual around the cross-level attention.
    pool
        ``"cls"`` or ``"mean"`` summary of each level.
    """

    def __init__(self, head: nn.Module, image_px: int = 224, token_px: int = 16,
                 level_scales: tuple[float, ...] = (1.0, 2.0, 4.0), embed_dim: int = 192, depth: int = 4,
                 heads: int = 9, head_dim: int = 64, cross_heads: int = 3, mlp_dim: int = 384, dropout: float = 0.0,
                 emb_dropout: float = 0.0, deform: bool = False, cross_residual: bool = False,
                 pool: str = "cls") -> None:
        super().__init__()
        scales = [float(s) for s in level_scales]
        n = len(scales)
        self.image_px, self.pool, self.n_levels = int(image_px), pool, n
        g = self.image_px // int(token_px)
        # plan[l]: (patch size, window side) of each grid of level l, finest first.
        self.plan: list[list[tuple[int, int]]] = []
        sizes: list[int] = []
        for lv in range(n):
            grids = []
            for m in range(lv + 1):
                ratio = scales[m] / scales[lv]
                grids.append((int(round(token_px * ratio)), int(round(token_px * ratio)) * g))
            self.plan.append(grids)
            sizes += [p for p, _ in grids if p not in sizes]
        self.embed = nn.ModuleDict(
            {str(p): DeformablePatchEmbedding(p, embed_dim, max(1, n * embed_dim * p // int(token_px)), deform=deform)
             for p in sizes}
        )
        self.pos = nn.ParameterList(nn.Parameter(torch.randn(1, (lv + 1) * g * g + 1, embed_dim)) for lv in range(n))
        self.cls = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            MultiLevelBlock(embed_dim, n, heads // n, head_dim, cross_heads, max(1, mlp_dim // n), mlp_dim, dropout,
                            cross_residual)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = head

    def tokens(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Embedded token sequences (with [CLS] and positions), one ``(B, 1 + (l + 1) g^2, D)`` per level.

        Parameters
        ----------
        levels
            One ``(B, 3, S, S)`` image batch per level, finest first.

        Returns
        -------
        list of torch.Tensor
            The sequences the blocks see.
        """
        out = []
        for lv, img in enumerate(levels):
            parts = [self.embed[str(p)](img, w) for p, w in self.plan[lv]]
            x = torch.cat([self.cls.expand(img.shape[0], -1, -1), *parts], dim=1)
            out.append(self.emb_dropout(x + self.pos[lv]))
        return out

    def forward(self, x: torch.Tensor) -> Any:
        """Predictions from ``(B, 3 L, S, S)`` images: the levels stacked on the channel axis, finest first."""
        levels = list(x.split(3, dim=1))
        xs = self.tokens(levels)
        for block in self.blocks:
            xs = block(xs)
        xs = [self.norm(t) for t in xs]
        pooled = [t[:, 0] if self.pool == "cls" else t.mean(dim=1) for t in xs]
        return self.head(torch.cat(pooled, dim=-1))


@register_method("m2ost")
class M2OST(SpotRegressor):
    """M2OST: crops of a spot at increasing fields of view, encoded jointly into one expression vector.

    Wang H., Du X., Liu J., et al., "M2OST: Many-to-one regression for
    predicting spatial transcriptomics from digital pathology images", AAAI
    2025, pp. 7709-7717; architecture and training settings from the authors'
    repository (``Dootmaan/M2OST``: ``model/M2OST.py``, ``train_m2ost_example.py``,
    ``dataset/HBCDataset.py``). Every setting with its source:
    ``docs/fidelity.md#m2ost``.

    - Levels: three square crops centred on the spot, fields of view 1x, 2x
      and 4x the finest (``level_scales=[1, 2, 4]``; HBCDataset.py:77-90 crops
      224, 448 and 896 px), each resized to ``patch_px=224`` pixels
      (HBCDataset.py:30). The finest field is ``patch_um`` microns (default:
      ``patch_px`` x the training slides' median mpp, i.e. 224 image pixels as
      in the repository); every level is read through he2st's lazy patch reader
      (one window per spot, never a whole level) at ``scale * patch_um_ /
      patch_px`` microns per pixel. The levels travel as one ``(S, S, 3L)``
      array per spot, so flips, rotations and test-time augmentation move all
      levels together.
    - Deformable patch embedding (M2OST.py:285-372): level ``l`` is tokenised
      by nested ``14 x 14`` grids, 16 px patches over the whole crop and
      8 / 4 px patches over the centred windows that the finer levels cover,
      each patch size with its own ``LN-Linear-GELU-Linear-LN`` embedding
      shared across levels (hidden widths 576, 288, 144); a shared [CLS]
      token and learned positions per level. ``deform=True`` adds learned
      per-patch offsets (:class:`he2st.methods.nn.multiscale.DeformablePatchEmbedding`);
      the repository has fixed grids, so the default is False.
    - Encoder (train_m2ost_example.py:25; M2OST.py:249-270): ``depth=4``
      blocks of 192-wide tokens per level (``embed_dim``; ``dim=192*3`` over
      three levels), each block intra-level self-attention (``heads=9`` in
      all, 3 per level, ``head_dim=64``), a token MLP shared by the levels
      (hidden ``mlp_dim / 3 = 128``, GELU after both layers), cross-level
      attention (``cross_heads=3``, M2OST.py:258; no residual, as in the
      repository: ``cross_residual=False``) and cross-level squeeze-excitation
      (hidden ``mlp_dim=384``); final LayerNorm, the [CLS] tokens of the three
      levels concatenated into one ``Linear(576, n_genes)`` (``pool="cls"``).
      Dropout 0 (M2OST.py:273).
    - Targets log1p(CPM) of the panel (HBCDataset.py:104; he2st's common
      ``cpm_log1p``); loss mean squared error (train_m2ost_example.py:43);
      Adam, lr 1e-4, batch 48, 200 epochs (lines 14-16, 40); augmentation
      random horizontal and vertical flips and a rotation by any angle with
      white fill (HBCDataset.py:29-35; preset ``"m2ost"``).

    Departures: the repository keeps the epoch with the best *test* Pearson
    (train_m2ost_example.py:97-103); he2st keeps the lowest loss on an inner
    validation split. Its level-3 crop of the centre (M2OST.py:362-363) takes
    84 instead of 56 px and does not fit its position table; the intended
    56 px window (the 1x field) is used. Frozen features do not apply: the
    network embeds pixels itself (``mode="finetune"`` only, trained from
    scratch as in the repository; no ``encoder``).

    CPU configuration (a few seconds per epoch on 32 px patches), e.g.
    ``patch_px=32, token_px=8, embed_dim=24, depth=1, heads=3, head_dim=8,
    mlp_dim=48, epochs=10, lr=1e-3``.

    Defaults
    --------
    normalization="cpm_log1p", seed=0, mode="finetune", encoder=None,
    weights=None, patch_px=224, patch_um=None, level_scales=[1, 2, 4],
    token_px=16, embed_dim=192, depth=4, heads=9, head_dim=64, cross_heads=3,
    mlp_dim=384, dropout=0.0, emb_dropout=0.0, deform=False,
    cross_residual=False, pool="cls", input_px=None (unused), tta=False,
    stain=None, augment="m2ost", epochs=200, batch_size=48, lr=1e-4,
    optimizer="adam", weight_decay=0.0, momentum=0.9 (unused), patience=None,
    val_split="auto", val_fraction=0.1, n_models=1, member_data="same",
    scheduler="none", lr_min=0.0, lr_step=30, lr_gamma=0.1, standardize=True
    (unused), stain_fit_spots=64, device="auto".

    Examples
    --------
    >>> m = he2st.methods.create_method("m2ost", patch_px=32, token_px=8, embed_dim=24, depth=1, heads=3)
    >>> m.fit(train_slides, panel)
    >>> pred = m.predict(test_slide)
    """

    paper: ClassVar[str] = "Wang et al., AAAI 2025 (M2OST)"
    capabilities: ClassVar[Capabilities] = Capabilities(frozen_features=False, finetune=True)
    defaults: ClassVar[dict[str, Any]] = {
        # Pixels only (no frozen features): no context views, no feature scaling.
        **{k: v for k, v in SPOT_DEFAULTS.items() if k not in ("context", "feature_scaling")},
        "mode": "finetune",
        "encoder": None,
        "weights": None,
        "patch_px": 224,
        "level_scales": [1, 2, 4],
        "token_px": 16,
        "embed_dim": 192,
        "depth": 4,
        "heads": 9,
        "head_dim": 64,
        "cross_heads": 3,
        "mlp_dim": 384,
        "dropout": 0.0,
        "emb_dropout": 0.0,
        "deform": False,
        "cross_residual": False,
        "pool": "cls",
        "augment": "m2ost",
        "epochs": 200,
        "batch_size": 48,
        "lr": 1e-4,
        "optimizer": "adam",
        "weight_decay": 0.0,
    }

    # -- parameters ---------------------------------------------------------------------
    def _scales(self) -> list[float]:
        return [float(s) for s in self.params["level_scales"]]

    def _check_params(self) -> None:
        super()._check_params()
        p = self.params

        def bad(msg: str) -> He2stInputError:
            return He2stInputError(f"method {self.name!r}: {msg}")

        if p["mode"] != "finetune":
            raise bad(f"mode must be 'finetune' (the network embeds pixels itself), got {p['mode']!r}")
        try:
            scales = self._scales()
        except (TypeError, ValueError):
            raise bad(f"level_scales must be a list of numbers, got {p['level_scales']!r}") from None
        if len(scales) < 2 or scales[0] != 1.0 or any(b <= a for a, b in zip(scales, scales[1:])):
            raise bad(f"level_scales must rise from 1 over at least two levels, got {p['level_scales']!r}")
        for key in ("patch_px", "token_px", "embed_dim", "depth", "heads", "head_dim", "cross_heads", "mlp_dim"):
            if int(p[key]) < 1:
                raise bad(f"{key} must be >= 1, got {p[key]!r}")
        size, tok = int(p["patch_px"]), int(p["token_px"])
        if size % tok:
            raise bad(f"patch_px ({size}) must be a multiple of token_px ({tok})")
        for lv, s in enumerate(scales):
            for m in range(lv):
                q = tok * scales[m] / s
                if abs(q - round(q)) > 1e-6 or round(q) < 1:
                    raise bad(f"token_px * {scales[m]:g} / {s:g} = {q:g} is not a whole patch of pixels; "
                              "choose token_px and level_scales so that it is")
        if int(p["heads"]) % len(scales):
            raise bad(f"heads ({p['heads']}) must be a multiple of the number of levels ({len(scales)})")
        if p["pool"] not in POOLS:
            raise bad(f"pool must be one of {POOLS}, got {p['pool']!r}")
        for key in ("dropout", "emb_dropout"):
            if not 0 <= float(p[key]) < 1:
                raise bad(f"{key} must be in [0, 1), got {p[key]!r}")

    # -- network ------------------------------------------------------------------------
    def _make_head(self, in_dim: int) -> nn.Module:
        return nn.Linear(in_dim, len(self.genes or []))

    def _build_model(self, seed: int) -> nn.Module:
        p = self.params
        width = len(self._scales()) * int(p["embed_dim"])
        return M2OSTNet(
            self._make_head(width), image_px=int(p["patch_px"]), token_px=int(p["token_px"]),
            level_scales=tuple(self._scales()), embed_dim=int(p["embed_dim"]), depth=int(p["depth"]),
            heads=int(p["heads"]), head_dim=int(p["head_dim"]), cross_heads=int(p["cross_heads"]),
            mlp_dim=int(p["mlp_dim"]), dropout=float(p["dropout"]), emb_dropout=float(p["emb_dropout"]),
            deform=bool(p["deform"]), cross_residual=bool(p["cross_residual"]), pool=str(p["pool"]),
        )

    # -- data ---------------------------------------------------------------------------
    def _level_patches(self, slide: Any, scale: float) -> np.ndarray:
        """``(n, S, S, 3)`` uint8 crops covering ``scale`` times the finest field, read window by window."""
        from he2st.methods.nn.inputs import resize_uint8

        size = self._patch_px(slide)
        if scale == 1.0:
            return np.asarray(self._patches(slide).images)
        if self.patch_um_ is None:
            # Pixel patches (no field of view in microns): cut scale x patch_px pixels, resize to patch_px.
            read, target = int(round(scale * size)), None
        else:
            mpp = self._slide_mpp(slide)
            target = scale * self.patch_um_ / size
            read = size
            if round(scale * self.patch_um_ / mpp) == size or abs(mpp - target) <= 1e-6 * target:
                target = None
        return resize_uint8(np.asarray(self._memo_patches(slide, read, target).images), size)

    def _inputs(self, slide: Any) -> np.ndarray:
        """Every level of every spot, stacked on the channel axis: uint8 ``(n, S, S, 3 L)``, finest first."""
        self.check_servable(slide)
        levels = []
        for s in self._scales():
            images = self._level_patches(slide, s)
            if self.stain_ is not None:
                images = self.stain_.transform(images)
            levels.append(np.asarray(images, dtype=np.uint8))
        return np.ascontiguousarray(np.concatenate(levels, axis=-1))

    # -- targets and loss ---------------------------------------------------------------
    def _targets(self, slide: Any) -> tuple[np.ndarray, ...]:
        return (np.asarray(self.train_targets(slide), dtype=np.float32),)

    def _loss(self, out: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, targets[0])

    def _decode(self, out: torch.Tensor) -> dict[str, np.ndarray]:
        return {"mean": out.float().cpu().numpy()}


__all__ = ["M2OST", "M2OSTNet"]
