"""Reading checkpoints and loading them into modules, with errors a user can act on.

Checkpoints are read without executing code: ``.safetensors`` through
safetensors, everything else through ``torch.load(..., weights_only=True)``.
A key or shape mismatch raises :class:`WeightsError` listing the missing,
unexpected and mis-shaped keys, so a wrong file (a ViT-B checkpoint for a
ViT-L, a whole CLIP model where a vision tower was expected) is obvious.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from he2st._utils import PathLike, sha256_file
from he2st.errors import He2stInputError

#: Container keys that wrap a state dict in training checkpoints, tried in order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "student")
#: How many keys of each kind an error message lists before summarising.
_SHOW = 12

KeyMap = Callable[[dict[str, Any]], dict[str, Any]] | Mapping[str, str]


class WeightsError(He2stInputError):
    """A checkpoint file cannot be read or does not fit the module it is loaded into."""


def read_state_dict(path: PathLike) -> dict[str, Any]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.ckpt``.

    Training checkpoints that wrap the weights (``{"state_dict": ...}``,
    ``{"model": ...}``, ``{"teacher": ...}``) are unwrapped, and a ``module.``
    prefix left by ``DataParallel`` is removed.

    Raises
    ------
    WeightsError
        The file is missing, is not a checkpoint, or needs code execution to load.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist (expected a .pth/.bin/.safetensors state dict)")
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"weights file {str(p)!r} is not a readable safetensors file: {exc}") from exc
    else:
        import pickle

        import torch

        try:
            try:
                # Memory-mapped: a multi-gigabyte checkpoint is not held twice in memory.
                sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                sd = torch.load(str(p), map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"weights file {str(p)!r} cannot be loaded with weights_only=True (it pickles code or "
                f"custom objects): save a plain state dict, e.g. torch.save(model.state_dict(), path). ({exc})"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - weights_only unpickler: KeyError, IndexError, ... on garbage
            raise WeightsError(
                f"weights file {str(p)!r} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
                "expected a state dict saved with torch.save or a .safetensors file"
            ) from exc
    return _unwrap(sd, p)


def _unwrap(sd: Any, path: Path) -> dict[str, Any]:
    import torch

    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(sd, Mapping):
            break
        if sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not sd:
        raise WeightsError(f"weights file {str(path)!r} holds no state dict (got {type(sd).__name__})")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"weights file {str(path)!r} holds no tensors (keys: {list(sd)[:_SHOW]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def apply_key_map(sd: dict[str, Any], key_map: KeyMap | None) -> dict[str, Any]:
    """Rename checkpoint keys: ``key_map`` is a function of the state dict or a ``{old_prefix: new_prefix}`` dict.

    Parameters
    ----------
    sd
        The state dict.
    key_map
        A function ``sd -> sd``, a ``{old_prefix: new_prefix}`` dict, or None (no renaming).

    Returns
    -------
    dict
        The renamed state dict.
    """
    if key_map is None:
        return dict(sd)
    if callable(key_map):
        return dict(key_map(dict(sd)))
    out = {}
    # Longest prefixes first, so that "blocks.0." wins over "blocks.".
    prefixes = sorted(key_map.items(), key=lambda kv: -len(kv[0]))
    for k, v in sd.items():
        for old, new in prefixes:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def load_weights(
    module: Any,
    path: PathLike | Mapping[str, Any],
    key_map: KeyMap | None = None,
    *,
    ignore: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> Any:
    """Load a checkpoint into ``module``, strictly.

    Parameters
    ----------
    module
        A ``torch.nn.Module``.
    path
        Checkpoint file (see :func:`read_state_dict`), or an in-memory state dict.
    key_map
        Renames checkpoint keys to the module's: a function ``state_dict -> state_dict``
        or a ``{old_prefix: new_prefix}`` mapping.
    ignore
        Regular expressions (``re.match`` on the mapped key) of checkpoint keys that
        are dropped on purpose, e.g. a text tower the module does not have.
    optional
        Regular expressions of module keys that may be absent from the checkpoint
        (they keep their current values), e.g. a classifier head unused for features.

    Returns
    -------
    The module, with the weights loaded.

    Raises
    ------
    WeightsError
        Missing keys, unexpected keys or shape mismatches, all listed, naming the file.
    """
    source = "<state dict>" if isinstance(path, Mapping) else str(path)
    sd = dict(path) if isinstance(path, Mapping) else read_state_dict(path)
    sd = apply_key_map(sd, key_map)
    ignore_re = [re.compile(p) for p in ignore]
    sd = {k: v for k, v in sd.items() if not any(r.match(k) for r in ignore_re)}
    own = module.state_dict()
    optional_re = [re.compile(p) for p in optional]
    missing = [k for k in own if k not in sd and not any(r.match(k) for r in optional_re)]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise WeightsError(_mismatch_message(source, type(module).__name__, missing, unexpected, shapes))
    for k in own:  # keep optional keys the checkpoint lacks
        sd.setdefault(k, own[k])
    module.load_state_dict(sd, strict=True)
    return module


def _mismatch_message(source: str, target: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    def block(title: str, items: list[str]) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:_SHOW])
        more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    return (
        f"weights {source!r} do not fit {target}:"
        + block("missing keys (in the model, not in the file)", missing)
        + block("unexpected keys (in the file, not in the model)", unexpected)
        + block("shape mismatches", shapes)
        + "\n  Is this checkpoint for this architecture? Pass key_map= to rename keys."
    )


def save_state_dict(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write a state dict atomically as ``.safetensors`` or a torch file (by extension).

    Parameters
    ----------
    state
        Name -> tensor.
    path
        Destination; ``.safetensors`` selects safetensors, anything else ``torch.save``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from he2st._utils import atomic_path

    p = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            import torch

            torch.save(tensors, str(tmp))
    return p


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) for the life of the process."""
    p = Path(path).resolve()
    st = os.stat(p)
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(p)
    return _SHA_MEMO[key]
