"""Where named ImageNet weight sets are looked up on disk (never downloaded).

``weights="imagenet"`` for a torchvision or timm architecture is a file the user
already has. It is looked for, in order, in

1. ``$HE2ST_WEIGHTS_DIR/<file name torchvision uses>`` (e.g. ``resnet50-0676ba61.pth``)
   or ``$HE2ST_WEIGHTS_DIR/<encoder name>.safetensors`` / ``.pth`` (e.g. ``vit_b16.safetensors``);
2. torch's hub cache ``$TORCH_HOME/hub/checkpoints/<file name>`` (default
   ``~/.cache/torch/hub/checkpoints``), where ``torchvision.models.resnet50(weights=...)``
   stores its downloads;
3. for timm ViTs, the Hugging Face hub cache
   ``$HF_HUB_CACHE/models--timm--<tag>/snapshots/*/model.safetensors``.

An explicit path (``weights="/path/file.pth"``) bypasses all of this. A missing
file raises :class:`~he2st.encoders.WeightsError` listing every place tried.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from he2st.encoders._weights import WeightsError

#: Environment variable naming a folder of weight files.
WEIGHTS_DIR_ENV = "HE2ST_WEIGHTS_DIR"


def torch_hub_checkpoints() -> Path:
    """torch's hub checkpoint folder, ``torch.hub.get_dir()/checkpoints`` (honours ``$TORCH_HOME``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_hub_cache() -> Path:
    # huggingface_hub's own rule: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _names(filename: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (filename,) if isinstance(filename, str) else tuple(filename or ())


def candidate_paths(encoder: str, filename: str | tuple[str, ...] | None, hf_tag: str | None = None) -> list[Path]:
    """Every file that may hold ``encoder``'s ImageNet weights, in lookup order.

    Parameters
    ----------
    encoder
        Registry name (also the stem of ``$HE2ST_WEIGHTS_DIR/<encoder>.safetensors``).
    filename
        torchvision's file name(s), preferred first, or None for architectures torchvision does not ship.
    hf_tag
        timm's pretrained tag on the Hugging Face hub (``vit_base_patch16_224.augreg2_in21k_ft_in1k``).

    Returns
    -------
    list of pathlib.Path
        Candidates; Hugging Face snapshot folders are expanded to the files present.
    """
    names = _names(filename)
    paths: list[Path] = []
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if folder:
        root = Path(folder).expanduser()
        paths += [root / n for n in names]
        paths += [root / f"{encoder}.safetensors", root / f"{encoder}.pth"]
    paths += [torch_hub_checkpoints() / n for n in names]
    if hf_tag:
        snap = _hf_hub_cache() / f"models--timm--{hf_tag}" / "snapshots"
        found = sorted(snap.glob("*/model.safetensors"))
        paths += found or [snap / "<revision>" / "model.safetensors"]
    return paths


def imagenet_lookup(encoder: str, filename: str | tuple[str, ...] | None, hf_tag: str | None = None) -> Callable[[], Path]:
    """A ``named_weights`` entry: returns the first existing candidate, else raises.

    Parameters
    ----------
    encoder
        Registry name.
    filename
        torchvision's checkpoint file name(s), preferred first (None for timm-only architectures).
    hf_tag
        timm's pretrained tag on the Hugging Face hub, or None.

    Returns
    -------
    callable
        ``() -> Path``; raises :class:`WeightsError` naming every path tried.
    """

    def find() -> Path:
        tried = candidate_paths(encoder, filename, hf_tag)
        for p in tried:
            if p.is_file():
                return p
        listed = "\n    ".join(str(p) for p in tried)
        env = "" if os.environ.get(WEIGHTS_DIR_ENV) else f" (${WEIGHTS_DIR_ENV} is not set)"
        hub = " or in torch's hub cache" if _names(filename) else ""
        name = (_names(filename) or (f"{encoder}.safetensors",))[0]
        raise WeightsError(
            f"encoder {encoder!r}: ImageNet weights not found; looked for:\n    {listed}\n"
            f"he2st never downloads weights. Put the checkpoint {name!r} in a folder named by "
            f"${WEIGHTS_DIR_ENV}{env}{hub}, or pass weights='/path/to/file'."
        )

    return find
