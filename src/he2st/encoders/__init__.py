"""Image encoders, feature extraction and the feature cache.

::

    from he2st.encoders import create_encoder, get_features
    enc = create_encoder("efficientnet_lite0", weights="imagenet")
    X = get_features(slide, "efficientnet_lite0", weights="imagenet")   # (n_spots, 1280), cached

Encoders (:func:`list_encoders`): ImageNet CNNs of the published methods
(``densenet121``, ``resnet18``, ``resnet50``, ``vgg16``, ``efficientnet_lite0``),
Hist2ST's ``convmixer``, ViTs (``vit_b16``, ``vit_b32``), pathology foundation
models (``uni``, ``uni2_h``, ``conch``, ``virchow2``, ``phikon``, ``ctranspath``,
``h_optimus_0``; weights from a local file) and the non-neural ``color_stats``.
"""

from __future__ import annotations

from he2st.encoders._base import (
    Encoder,
    EncoderInfo,
    create_encoder,
    get_spec,
    list_encoders,
    register_encoder,
)
from he2st.encoders._weights import WeightsError, load_weights, read_state_dict
from he2st.encoders.features import (
    extract_features,
    feature_key,
    get_features,
    get_tokens,
    preprocess,
)

__all__ = [
    "Encoder",
    "EncoderInfo",
    "WeightsError",
    "create_encoder",
    "extract_features",
    "feature_key",
    "get_features",
    "get_spec",
    "get_tokens",
    "list_encoders",
    "load_weights",
    "preprocess",
    "read_state_dict",
    "register_encoder",
]
