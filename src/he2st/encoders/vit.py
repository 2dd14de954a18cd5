"""Transformer encoders: ImageNet ViTs and the pathology foundation models, as timm architectures.

Every entry builds the architecture only (random init, no download); the
weights come from a checkpoint file the user downloaded (gated models need a
licence agreement with their authors). The configurations follow the model
cards and HEST's benchmark code (mahmoodlab/HEST ``inference_models.py``).

==================  ======  ========  ====================================================
name                dim     tokens    architecture, pooling, normalisation
==================  ======  ========  ====================================================
``vit_b16``         768     197x768   ViT-B/16 224, CLS; mean/std 0.5 (timm/Google ViTs)
``vit_b32``         768     50x768    ViT-B/32 224, CLS (CMRCNet); mean/std 0.5
``uni``             1024    197x1024  ViT-L/16 224, LayerScale 1e-5, CLS; ImageNet
``uni2_h``          1536    265x1536  ViT-H/14 (24 blocks, 1536 wide, SwiGLU, 8 registers), CLS; ImageNet
``conch``           512     785x768   CONCH ViT-B/16 448 + attentional pooler (HEST: pre-projection); CLIP
``virchow2``        2560    261x1280  ViT-H/14 (SwiGLU, 4 registers), CLS ++ mean(patch tokens); ImageNet
``phikon``          768     197x768   iBOT ViT-B/16 224 (HF ``ViTModel`` keys accepted), CLS; ImageNet
``ctranspath``      768     49x768    Swin-T with a convolutional stem, mean-pooled; ImageNet
``h_optimus_0``     1536    261x1536  ViT-g/14 (DINOv2, 4 registers, SwiGLU), CLS; H-optimus means
==================  ======  ========  ====================================================

Token counts are at the default input size (ViTs: CLS + registers + patches).
``uni2_h``, ``virchow2`` and ``h_optimus_0`` have 0.6-1.1 billion parameters;
``create_encoder(name, device="meta")`` builds them without memory to inspect shapes.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch import nn

from he2st.encoders._base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Encoder,
    EncoderInfo,
    register_encoder,
)
from he2st.encoders._hub import imagenet_lookup
from he2st.encoders._weights import WeightsError
from he2st.errors import He2stInputError

#: H-optimus-0's own normalisation (bioptimus model card).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


class TimmViT(Encoder):
    """A timm ``VisionTransformer``; features are the CLS token, or CLS ++ mean of patch tokens.

    Parameters
    ----------
    info
        What the encoder is (see :class:`~he2st.encoders.EncoderInfo`).
    model
        The timm model.
    pool
        ``"cls"`` or ``"cls+mean"``.
    """

    # Classification heads of ImageNet checkpoints are not part of the features.
    ignored_keys = (r"head\.",)

    def __init__(self, info: EncoderInfo, model: nn.Module, pool: str = "cls") -> None:
        super().__init__(info, model)
        if pool not in ("cls", "cls+mean"):
            raise ValueError(f"pool must be 'cls' or 'cls+mean', got {pool!r}")
        self.pool = pool

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        tokens = self.forward_tokens(x)
        cls = tokens[:, 0]
        if self.pool == "cls+mean":
            # Virchow's embedding: registers (after CLS) are excluded from the patch mean.
            return torch.cat([cls, tokens[:, self.model.num_prefix_tokens :].mean(1)], dim=-1)
        return cls


def _options(name: str, kw: dict[str, Any], size: int, mean: tuple, std: tuple) -> tuple[int, tuple, tuple]:
    size = int(kw.pop("input_size", size))
    mean, std = tuple(kw.pop("mean", mean)), tuple(kw.pop("std", std))
    if kw:
        raise He2stInputError(f"encoder {name!r}: unknown option(s) {sorted(kw)}; known: input_size, mean, std")
    return size, mean, std


def _timm_vit(
    name: str,
    timm_name: str,
    kw: dict[str, Any],
    *,
    img_size: int,
    mean: tuple,
    std: tuple,
    pool: str = "cls",
    **timm_kwargs: Any,
) -> TimmViT:
    import timm

    size, mean, std = _options(name, kw, img_size, mean, std)
    # Built at the checkpoint's native size; dynamic_img_size resamples the position
    # embedding for other input sizes (a no-op at the native size).
    model = timm.create_model(
        timm_name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True, **timm_kwargs
    )
    patch = model.patch_embed.patch_size[0]
    if size % patch:
        raise He2stInputError(f"encoder {name!r}: input_size {size} is not a multiple of the patch size {patch}")
    width = model.embed_dim
    info = EncoderInfo(
        name=name, arch=f"timm:{timm_name}", input_size=size, mean=mean, std=std,
        dim=2 * width if pool == "cls+mean" else width, has_tokens=True, token_dim=width,
        n_tokens=(size // patch) ** 2 + model.num_prefix_tokens, kind="vit",
    )
    return TimmViT(info, model, pool)


@register_encoder("vit_b16", kind="vit", dim=768, description="ViT-B/16, 768-d CLS",
    named_weights={"imagenet": imagenet_lookup("vit_b16", None, "vit_base_patch16_224.augreg2_in21k_ft_in1k")},
)
def vit_b16(**kw: Any) -> Encoder:
    """ViT-B/16 at 224 px: CLS token, 768-d; 197 tokens."""
    return _timm_vit("vit_b16", "vit_base_patch16_224", kw, img_size=224, mean=INCEPTION_MEAN, std=INCEPTION_STD)


@register_encoder("vit_b32", kind="vit", dim=768, description="ViT-B/32 (CMRCNet), 768-d CLS",
    named_weights={"imagenet": imagenet_lookup("vit_b32", None, "vit_base_patch32_224.augreg_in21k_ft_in1k")},
)
def vit_b32(**kw: Any) -> Encoder:
    """ViT-B/32 at 224 px (CMRCNet): CLS token, 768-d; 50 tokens (CLS + 7 x 7)."""
    return _timm_vit("vit_b32", "vit_base_patch32_224", kw, img_size=224, mean=INCEPTION_MEAN, std=INCEPTION_STD)


@register_encoder("uni", kind="vit", dim=1024, description="UNI (ViT-L/16), 1024-d")
def uni(**kw: Any) -> Encoder:
    """UNI (Chen et al. 2024, MahmoodLab/UNI): ViT-L/16, 224 px, LayerScale, CLS 1024-d."""
    return _timm_vit("uni", "vit_large_patch16_224", kw, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, init_values=1e-5)


@register_encoder("uni2_h", kind="vit", dim=1536, description="UNI2-h (ViT-H/14, 8 registers), 1536-d", huge=True)
def uni2_h(**kw: Any) -> Encoder:
    """UNI2-h (MahmoodLab/UNI2-h): ViT-H/14, 24 blocks x 1536, SwiGLU, 8 register tokens, CLS 1536-d."""
    from timm.layers import SwiGLUPacked

    return _timm_vit(
        "uni2_h", "vit_giant_patch14_224", kw, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        patch_size=14, depth=24, num_heads=24, embed_dim=1536, init_values=1e-5, mlp_ratio=2.66667 * 2,
        no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8,
    )


@register_encoder("virchow2", kind="vit", dim=2560, description="Virchow2 (ViT-H/14), 2560-d", huge=True)
def virchow2(**kw: Any) -> Encoder:
    """Virchow2 (paige-ai/Virchow2): ViT-H/14, SwiGLU, 4 registers; CLS ++ mean patch token = 2560-d."""
    from timm.layers import SwiGLUPacked

    return _timm_vit(
        "virchow2", "vit_huge_patch14_224", kw, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pool="cls+mean", init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4,
        mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
    )


@register_encoder("h_optimus_0", kind="vit", dim=1536, description="H-optimus-0 (ViT-g/14), 1536-d", huge=True)
def h_optimus_0(**kw: Any) -> Encoder:
    """H-optimus-0 (bioptimus): DINOv2 ViT-g/14 with 4 registers, 224 px, CLS 1536-d."""
    return _timm_vit(
        "h_optimus_0", "vit_giant_patch14_reg4_dinov2", kw, img_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        init_values=1e-5,
    )


# --------------------------------------------------------------------------- Phikon (HF ViTModel keys)


class Phikon(TimmViT):
    """Phikon's iBOT ViT-B/16; reads timm keys or Hugging Face ``ViTModel`` keys.

    Parameters
    ----------
    info
        What the encoder expects and returns (:class:`~he2st.encoders.EncoderInfo`).
    model
        The network (randomly initialised; weights are loaded by
        :func:`~he2st.encoders.create_encoder`).
    pool
        ``"cls"`` (the class token) or ``"cls+mean"`` (class token and mean patch token).
    """

    ignored_keys = (r"head\.", r"pooler\.", r"classifier\.")

    def convert_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Map this checkpoint layout's keys onto ``self.model``'s."""
        if any(k.startswith(("embeddings.", "vit.embeddings.")) for k in sd):
            return hf_vit_to_timm(sd)
        return sd


_HF_LAYER = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def hf_vit_to_timm(sd: dict[str, Any]) -> dict[str, Any]:
    """Rename a Hugging Face ``ViTModel`` state dict to timm ``VisionTransformer`` keys.

    Query, key and value projections are concatenated into timm's fused ``qkv``.
    Keys without a counterpart (the HF pooler) are passed through, to be ignored
    or reported by the strict loader.
    """
    sd = {k[len("vit.") :] if k.startswith("vit.") else k: v for k, v in sd.items()}
    out: dict[str, Any] = {}
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer_re = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        m = layer_re.match(k)
        if not m:
            out[k] = v
            continue
        i, inner, wb = int(m.group(1)), m.group(2), m.group(3)
        if inner.startswith("attention.attention."):
            qkv.setdefault((i, wb), {})[inner.rsplit(".", 1)[1]] = v
        elif inner in _HF_LAYER:
            out[f"blocks.{i}.{_HF_LAYER[inner]}.{wb}"] = v
        else:
            out[k] = v
    for (i, wb), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsError(f"layer {i}: attention {wb} has only {sorted(parts)} of query/key/value")
        out[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


@register_encoder("phikon", kind="vit", dim=768, description="Phikon (iBOT ViT-B/16), 768-d")
def phikon(**kw: Any) -> Encoder:
    """Phikon (Filiot et al. 2023, owkin/phikon): ViT-B/16 224 px, CLS of the last hidden state, 768-d.

    HF ``ViTModel`` uses LayerNorm eps 1e-12 (timm's default is 1e-6); we match HF.
    """
    import timm

    size, mean, std = _options("phikon", kw, 224, IMAGENET_MEAN, IMAGENET_STD)
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=224, dynamic_img_size=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-12),
    )
    if size % 16:
        raise He2stInputError(f"encoder 'phikon': input_size {size} is not a multiple of 16")
    info = EncoderInfo(
        name="phikon", arch="timm:vit_base_patch16_224(ln_eps=1e-12)", input_size=size, mean=mean, std=std,
        dim=768, has_tokens=True, token_dim=768, n_tokens=(size // 16) ** 2 + 1, kind="vit",
    )
    return Phikon(info, model)


# --------------------------------------------------------------------------- CONCH


class _AttentionalPooler(nn.Module):
    """Learned queries attending over the trunk tokens (CoCa's pooler, as in CONCH)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        k = self.ln_k(x).transpose(0, 1)  # (L, B, C): MultiheadAttention is sequence-first
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)
        return self.attn(q, k, k, need_weights=False)[0].transpose(0, 1)


class _ConchVisual(nn.Module):
    def __init__(self, trunk: nn.Module, embed_dim: int = 512, heads: int = 8) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = _AttentionalPooler(embed_dim, trunk.embed_dim, heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        # Loaded for completeness; HEST's CONCH features stop before this projection.
        self.proj_contrast = nn.Parameter(trunk.embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))


class Conch(Encoder):
    """CONCH's vision tower; features = ``encode_image(proj_contrast=False, normalize=False)`` (512-d).

    Parameters
    ----------
    info
        What the encoder expects and returns (:class:`~he2st.encoders.EncoderInfo`).
    model
        The network (randomly initialised; weights are loaded by
        :func:`~he2st.encoders.create_encoder`).
    """

    # The captioning pooler and the text towers are not part of the image features.
    ignored_keys = (r"attn_pool_caption\.", r"ln_caption\.")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return self.model.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        pooled = self.model.attn_pool_contrast(self.forward_tokens(x))[:, 0]
        return self.model.ln_contrast(pooled)

    def convert_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Map this checkpoint layout's keys onto ``self.model``'s."""
        if any(k.startswith("visual.") for k in sd):
            # A whole CoCa checkpoint: keep the vision tower, drop text/decoder/logit_scale.
            return {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        return sd


@register_encoder("conch", kind="vit", dim=512, description="CONCH vision tower, 512-d")
def conch(**kw: Any) -> Encoder:
    """CONCH (Lu et al. 2024, MahmoodLab/CONCH): ViT-B/16 at 448 px + attentional pooler, 512-d."""
    from timm.models.vision_transformer import VisionTransformer

    size, mean, std = _options("conch", kw, 448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if size % 16:
        raise He2stInputError(f"encoder 'conch': input_size {size} is not a multiple of 16")
    trunk = VisionTransformer(
        img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
        num_classes=0, dynamic_img_size=True,
    )
    info = EncoderInfo(
        name="conch", arch="conch:ViT-B-16(448)+attn_pool", input_size=size, mean=mean, std=std, dim=512,
        has_tokens=True, token_dim=768, n_tokens=(size // 16) ** 2 + 1, kind="vit",
    )
    return Conch(info, _ConchVisual(trunk))


# --------------------------------------------------------------------------- CTransPath


class _ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv/BN/ReLU, then a 1x1 conv (4x downsampling).

    Accepts timm's ``embed_layer`` keyword interface and returns NHWC, as timm's
    Swin expects.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        output_fmt: str = "NHWC",
        **_: Any,
    ) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("CTransPath's stem needs patch_size 4 and embed_dim divisible by 8")
        if output_fmt != "NHWC":
            raise ValueError(f"_ConvStem returns NHWC, not {output_fmt}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class CTransPath(Encoder):
    """Swin-T with a conv stem; reads the released ``ctranspath.pth`` (old timm Swin layout).

    Parameters
    ----------
    info
        What the encoder expects and returns (:class:`~he2st.encoders.EncoderInfo`).
    model
        The network (randomly initialised; weights are loaded by
        :func:`~he2st.encoders.create_encoder`).
    """

    ignored_keys = (r"head\.",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return self.model(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        fmap = self.model.forward_features(x)  # (B, H, W, C)
        return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])

    def convert_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Map this checkpoint layout's keys onto ``self.model``'s."""
        from timm.models.swin_transformer import checkpoint_filter_fn

        # timm's converter moves end-of-stage downsampling (timm<0.9) to the start of the next
        # stage and drops non-persistent buffers (attention masks, relative position indices).
        return checkpoint_filter_fn(sd, self.model)


@register_encoder("ctranspath", kind="swin", dim=768, description="CTransPath (Swin-T + conv stem), 768-d")
def ctranspath(**kw: Any) -> Encoder:
    """CTransPath (Wang et al. 2022): Swin-T (window 7) with a convolutional stem, 224 px, mean-pooled 768-d."""
    import timm

    size, mean, std = _options("ctranspath", kw, 224, IMAGENET_MEAN, IMAGENET_STD)
    if size % 32:
        raise He2stInputError(f"encoder 'ctranspath': input_size {size} is not a multiple of 32")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=_ConvStem, img_size=size,
        window_size=min(7, size // 32),
    )
    info = EncoderInfo(
        name="ctranspath", arch="timm:swin_tiny_patch4_window7_224+convstem", input_size=size, mean=mean,
        std=std, dim=768, has_tokens=True, token_dim=768, n_tokens=(size // 32) ** 2, kind="swin",
    )
    return CTransPath(info, model)
