"""CMRCNet: contrastive learning plus cross-modal masked reconstruction, prediction by retrieval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from he2st.errors import He2stInputError
from he2st.methods.base import Capabilities
from he2st.methods.registry import register_method
from he2st.methods.nn.attention import MultiHeadAttention, TransformerBlock, attend
from he2st.methods.nn.heads import SNN, ProjectionHead
from he2st.methods.nn.losses import RECONSTRUCTION, contrastive_loss, reconstruction_loss
from he2st.methods.families.contrastive import CONTRASTIVE_DEFAULTS, ContrastiveRetrieval, RetrievalNet

RECON_TARGETS = ("image", "expression")


def mask_features(x: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a random ``rate`` fraction of the *elements* of ``x`` (CMRCNet masks feature pixels, not tokens).

    Parameters
    ----------
    x
        Features of any shape.
    rate
        Share of elements zeroed, in ``[0, 1)``.
    generator
        CPU generator of the mask (None: the global one, on ``x``'s device).

    Returns
    -------
    torch.Tensor
        ``x`` with the masked elements zeroed (``x`` itself when ``rate`` is 0).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"mask rate must be in [0, 1), got {rate}")
    if rate == 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device) >= rate
    return x * keep.to(device=x.device, dtype=x.dtype)


class ResidualCrossAttention(nn.Module):
    """CMRCNet's residual cross-attention (its Fig. 8).

    ``q = ReLU(Drop(W_q x))``, ``k = ReLU(Drop(W_k y))`` (dropout 0.25 as in the
    authors' code); the output is ``W_v1 q + softmax(q k^T / sqrt(d_h)) W_v2 k``
    per head: a value taken from the *image* features is added to the
    attention-weighted gene values, so the fused features never depend on
    the (noisy) expression alone.

    Parameters
    ----------
    dim
        Token width (divisible by ``heads``).
    heads
        Attention heads.
    dropout
        Dropout inside the query and key maps.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.25) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.fc_q = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.fc_k = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.v_image = nn.Linear(dim, dim)
        self.v_context = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fused features of image tokens guided by context tokens.

        Parameters
        ----------
        x
            ``(B, N, dim)`` image tokens (queries and the residual value).
        y
            ``(B, M, dim)`` context tokens (keys and attended values).

        Returns
        -------
        torch.Tensor
            ``(B, N, dim)``.
        """
        q, k = self.fc_q(x), self.fc_k(y)
        return self.v_image(q) + attend(q, k, self.v_context(k), self.heads)


class FusionBlock(nn.Module):
    """Transformer block on the image tokens, then ``x + ResidualCrossAttention(x, context)``.

    Parameters
    ----------
    dim
        Token width.
    heads
        Attention heads of both attentions.
    mlp_ratio
        MLP hidden width over ``dim``.
    dropout
        Dropout of the Transformer block.
    """

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.block = TransformerBlock(dim, heads=heads, mlp_dim=int(dim * mlp_ratio), qkv_bias=True, dropout=dropout)
        self.cross = ResidualCrossAttention(dim, heads=heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Fused tokens.

        Parameters
        ----------
        x
            ``(B, N, dim)`` tokens.
        context
            ``(B, M, dim)`` context tokens of the other modality.

        Returns
        -------
        torch.Tensor
            ``(B, N, dim)``.
        """
        x = self.block(x)
        return x + self.cross(x, context)


class CMRCNetNet(RetrievalNet):
    """Token-mean image projection, expression projection, and the cross-modal reconstruction branch.

    Parameters
    ----------
    feature_dim, n_genes
        Token width of the image encoder and number of genes.
    embed_dim, dropout
        Width and dropout of the two projection heads.
    temperature, lam
        Contrastive loss settings (:func:`he2st.methods.nn.losses.contrastive_loss`).
    reconstruction, mask_rate, recon_loss, recon_target, recon_dim
        The reconstruction branch: on/off, masked share, loss, masked modality
        and latent width (equal to ``embed_dim``).
    gene_tokens, snn_dropout
        Expression tokens made by the SNN, and its dropout.
    cross_heads, fusion_heads, fusion_blocks, fusion_dropout
        First cross-attention heads, and the fusion blocks' heads, number and dropout.
    backbone, mean, std
        Finetuning backbone and its pixel normalisation (see :class:`RetrievalNet`).
    """

    def __init__(self, feature_dim: int, n_genes: int, *, embed_dim: int, dropout: float, temperature: float,
                 lam: float, reconstruction: bool, mask_rate: float, recon_loss: str, recon_target: str,
                 recon_dim: int, gene_tokens: int, snn_dropout: float, cross_heads: int, fusion_heads: int,
                 fusion_blocks: int, fusion_dropout: float, backbone: nn.Module | None = None,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__(feature_dim, backbone, True, mean, std)
        self.image_projection = ProjectionHead(feature_dim, embed_dim, dropout)
        self.spot_projection = ProjectionHead(n_genes, embed_dim, dropout)
        self.temperature, self.lam = temperature, lam
        self.reconstruction, self.mask_rate = reconstruction, mask_rate
        self.recon_loss, self.recon_target = recon_loss, recon_target
        self.gene_tokens, self.recon_dim = gene_tokens, recon_dim
        if reconstruction:
            if recon_dim != embed_dim:
                raise He2stInputError(f"cmrcnet: recon_dim ({recon_dim}) must equal embed_dim ({embed_dim}): "
                                      "the reconstruction is compared with an embedding")
            self.image_latent = nn.Linear(feature_dim, recon_dim)
            self.gene_snn = SNN(n_genes, gene_tokens * recon_dim, snn_dropout)
            self.first_attention = MultiHeadAttention(recon_dim, cross_heads, recon_dim // cross_heads, qkv_bias=True)
            self.fusion = nn.ModuleList([FusionBlock(recon_dim, fusion_heads, 4.0, fusion_dropout)
                                         for _ in range(fusion_blocks)])

    def embed_image(self, feats: torch.Tensor) -> torch.Tensor:
        return self.image_projection(feats.mean(dim=1))

    def embed_expression(self, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.spot_projection(expr)

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """Reconstruction of the masked modality, guided by the other one.

        Parameters
        ----------
        tokens
            ``(B, T, feature_dim)`` image tokens.
        expr
            ``(B, n_genes)`` expression.

        Returns
        -------
        torch.Tensor
            ``(B, recon_dim)``.
        """
        img = self.image_latent(tokens)  # (B, T, 256)
        gene = self.gene_snn(expr).view(expr.shape[0], self.gene_tokens, self.recon_dim)  # (B, 8, 256)
        if self.recon_target == "image":
            query, context = mask_features(img, self.mask_rate), gene
        else:
            query, context = mask_features(gene, self.mask_rate), img
        latent = self.first_attention(query, context)
        for block in self.fusion:
            latent = block(latent, context)
        return latent.mean(dim=1)

    def loss(self, feats: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        img = self.embed_image(feats)
        spot = self.embed_expression(expr, pos)
        lc = contrastive_loss(img, spot, targets="soft", temperature=self.temperature, lam=self.lam)
        if not self.reconstruction:
            return lc
        target = img if self.recon_target == "image" else spot
        lr = reconstruction_loss(self.reconstruct(feats, expr), target, self.recon_loss)
        # log(1 + L) balances two losses of different magnitude (CMRCNet, "Loss function").
        return torch.log1p(lc) + torch.log1p(lr)


@register_method("cmrcnet")
class CMRCNet(ContrastiveRetrieval):
    """CMRCNet: contrastive learning with cross-modal mask reconstruction.

    Liu J., Eckstein M., Wang Z., Feuerhake F., Merhof D., "Spatial
    transcriptomics expression prediction from histopathology based on
    cross-modal mask reconstruction and contrastive learning" (seed paper
    004), with the settings of the authors' repository (``ngfufdrdh/CMRCNet``):

    - 224 px patches; ViT-B/32 image encoder trained from scratch (no
      pretrained weights) giving 50 tokens x 768; augmentation: flips and
      rotations;
    - contrastive branch: token mean -> projection head (256); expression ->
      projection head (256); BLEEP's soft-target cross-entropy, ``tau = 1``;
    - reconstruction branch: image tokens -> linear 768 -> 256; a random 50%
      of the feature *elements* masked; expression -> SNN (linear + SELU +
      AlphaDropout 0.25) to 2048 = 8 tokens x 256; cross-attention (queries
      from the masked image features, keys/values from the gene tokens, 4
      heads); two fusion blocks (Transformer block with 8 heads, MLP ratio 4,
      dropout 0.1, ending in the residual cross-attention whose value also
      comes from the image features); token mean -> MSE to the image
      projection;
    - loss ``log(1 + L_c) + log(1 + L_r)``; AdamW, lr 1e-4 (weight decay 1e-3
      from the repository's configuration), batch 64, 60 epochs; the
      learning rate decays by cosine annealing to 1e-5 (``scheduler="cosine"``,
      ``lr_min=1e-5``; ``config.py:26-27``, ``train.py:135``, stepped before
      each epoch); a random 20 % of the spots of EVERY training slide are
      held out (``val_split="spot_per_slide"``, ``val_fraction=0.2``;
      ``utils_data/splits.py:26-27``) and the weights of the epoch with the
      lowest validation loss are kept (``train.py:161-163``); the held-out
      spots stay in the reference bank;
    - inference: expression embeddings of the training spots, top 50 by cosine
      similarity, mean expression (CMRCNet-500: ``top_k=500``).

    Ablation switches (paper Table 5): ``reconstruction`` (False: contrastive
    loss only), ``mask_rate`` (0.3 / 0.5 / 0.7), ``recon_loss`` (``"mse"`` or
    ``"cosine"``), ``recon_target`` (``"image"``, or ``"expression"``: mask the
    gene tokens and reconstruct the expression embedding guided by the image
    tokens).

    In frozen mode any encoder with tokens serves (ViT tokens or the cells of
    a CNN feature map, :func:`he2st.encoders.get_tokens`); the paper's ViT is
    trained from scratch, so frozen random ViT tokens are only a placeholder:
    pass e.g. ``encoder="efficientnet_lite0", weights="imagenet"``.

    Departures (see ``docs/fidelity.md#cmrcnet``): the repository's two
    fusion blocks share one set of weights (the same module listed twice);
    the paper describes two blocks, which is what this port builds. The
    repository averages ``log(1 + L)`` over spots; we take ``log(1 + mean L)``
    as the paper's formula. The repository's ViT-B/32 has depth 8 and 8 heads
    (``model/vit_model.py:563``), the paper's ViT-B 12 x 12 (our
    ``vit_b32``). Its SNN uses ELU + AlphaDropout (the original SNN, and this
    port, SELU). Its ``mask_prob`` is the share of features KEPT
    (``model/models.py:64-65``: ``mask = rand < mask_prob``), so its 0.3 / 0.7
    ablations correspond to our ``mask_rate`` 0.7 / 0.3 (0.5 is the same).

    Defaults
    --------
    normalization="cpm_log1p", seed=0, mode="frozen", encoder="vit_b32",
    weights=None, patch_px=224, input_px=None, augment="bleep",
    standardize=True, embed_dim=256, dropout=0.1, temperature=1.0, lam=0.5,
    reconstruction=True, mask_rate=0.5, recon_loss="mse", recon_target="image",
    recon_dim=256, gene_tokens=8, snn_dropout=0.25, cross_heads=4,
    fusion_heads=8, fusion_blocks=2, fusion_dropout=0.1, epochs=60,
    batch_size=64, lr=1e-4, optimizer="adamw", weight_decay=1e-3,
    patience=None, scheduler="cosine", lr_min=1e-5, val_split="spot_per_slide",
    val_fraction=0.2, top_k=50, select_metric="cosine", weight_metric=None,
    aggregation="mean", softmax_temperature=1.0, search="exact",
    search_backend="torch", target_recall=0.95, bank_chunk=None,
    reference_slides=None, reference_fill_missing=False, reference_correction=None,
    exclude_test_patient="auto", on_bank_overlap="error", device="auto",
    patch_um=None, context=None (refused: CMRCNet reads tokens), feature_scaling="standard" (tokens: the only kind).
    """

    paper: ClassVar[str] = "Liu et al. (CMRCNet, seed paper 004)"

    input_kind: ClassVar[str] = "tokens"
    capabilities: ClassVar[Capabilities] = Capabilities(frozen_features=True, finetune=True, needs_tokens=True)
    defaults: ClassVar[dict[str, Any]] = {
        **CONTRASTIVE_DEFAULTS,
        "encoder": "vit_b32",
        "weights": None,
        "augment": "bleep",
        "embed_dim": 256,
        "dropout": 0.1,
        "temperature": 1.0,
        "lam": 0.5,
        "reconstruction": True,
        "mask_rate": 0.5,
        "recon_loss": "mse",
        "recon_target": "image",
        "recon_dim": 256,
        "gene_tokens": 8,
        "snn_dropout": 0.25,
        "cross_heads": 4,
        "fusion_heads": 8,
        "fusion_blocks": 2,
        "fusion_dropout": 0.1,
        "epochs": 60,
        "batch_size": 64,
        "lr": 1e-4,
        "optimizer": "adamw",
        "weight_decay": 1e-3,
        "scheduler": "cosine",
        "lr_min": 1e-5,
        "val_split": "spot_per_slide",
        "val_fraction": 0.2,
        "top_k": 50,
        "select_metric": "cosine",
        "aggregation": "mean",
    }

    def _check_params(self) -> None:
        super()._check_params()
        p = self.params
        if not 0 <= float(p["mask_rate"]) < 1:
            raise He2stInputError(f"method 'cmrcnet': mask_rate must be in [0, 1), got {p['mask_rate']!r}")
        if p["recon_loss"] not in RECONSTRUCTION:
            raise He2stInputError(f"method 'cmrcnet': recon_loss must be one of {RECONSTRUCTION}, got {p['recon_loss']!r}")
        if p["recon_target"] not in RECON_TARGETS:
            raise He2stInputError(f"method 'cmrcnet': recon_target must be one of {RECON_TARGETS}, got {p['recon_target']!r}")
        for key, heads in (("recon_dim", "cross_heads"), ("recon_dim", "fusion_heads")):
            if int(p[heads]) < 1 or int(p[key]) % int(p[heads]):
                raise He2stInputError(f"method 'cmrcnet': {key}={p[key]} must be a multiple of {heads}={p[heads]}")
        if int(p["gene_tokens"]) < 1 or int(p["fusion_blocks"]) < 0:
            raise He2stInputError("method 'cmrcnet': gene_tokens must be >= 1 and fusion_blocks >= 0")

    def _make_net(self, feature_dim: int, n_genes: int, n_tokens: int | None, backbone: nn.Module | None,
                  mean: Sequence[float], std: Sequence[float]) -> RetrievalNet:
        p = self.params
        return CMRCNetNet(
            feature_dim, n_genes, embed_dim=int(p["embed_dim"]), dropout=float(p["dropout"]),
            temperature=float(p["temperature"]), lam=float(p["lam"]), reconstruction=bool(p["reconstruction"]),
            mask_rate=float(p["mask_rate"]), recon_loss=str(p["recon_loss"]), recon_target=str(p["recon_target"]),
            recon_dim=int(p["recon_dim"]), gene_tokens=int(p["gene_tokens"]), snn_dropout=float(p["snn_dropout"]),
            cross_heads=int(p["cross_heads"]), fusion_heads=int(p["fusion_heads"]),
            fusion_blocks=int(p["fusion_blocks"]), fusion_dropout=float(p["fusion_dropout"]),
            backbone=backbone, mean=mean, std=std,
        )
