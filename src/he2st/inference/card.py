"""A model folder: the fitted method plus ``card.json``, what it was trained on and how, verified on load.

::

    model/
      method.json          Method.save: name, parameters, genes, normalisers
      state.safetensors    Method.save: the learned arrays (no code)
      card.json            this module: the model card

``card.json`` holds the training slides and their patients, the genes, the
target normalisation(s), the image encoder(s) with the sha256 of their weights
where known, the patch size and field of view, the he2st version, the options
the model was trained with, optional inner cross-validation metrics and the
sha256 of ``method.json`` and ``state.safetensors``. :func:`load_model`
refuses a folder whose files do not match those digests
(:class:`ModelTamperedError`), one written by another he2st major.minor
version (:class:`ModelVersionError`), and one whose frozen encoder weights
differ from the ones the model was trained on
(:class:`he2st.errors.WeightsMismatchError`, from
:meth:`he2st.methods.base.Method.check_weights_identity`).

The folder is written into a temporary folder beside it and renamed when
complete: it appears whole or not at all.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_dir, json_default_or_str, jsonable, sha256_file
from he2st.data.slide import meta
from he2st.errors import He2stInputError

CARD_FILE = "card.json"
#: Format of ``card.json``: bump when a reader of an older card would misread a new one.
CARD_FORMAT = 1
#: Files of the saved method whose digests the card records.
DIGESTED = ("method.json", "state.safetensors")


class ModelCardError(He2stInputError):
    """A model folder has no readable ``card.json``, or a card that does not describe it."""


class ModelTamperedError(ModelCardError):
    """A model folder's files do not match the sha256 digests of its card (edited or damaged)."""


class ModelVersionError(ModelCardError):
    """A model folder was written by another he2st major.minor version."""


def _major_minor(version: str) -> tuple[str, str]:
    parts = re.findall(r"\d+", str(version))
    return (parts + ["0", "0"])[0], (parts + ["0", "0"])[1]


def training_spot_layout(slides: Sequence[Any]) -> dict[str, Any] | None:
    """Pitch, spot diameter (µm) and lattice kind of the training spots (medians over slides).

    The pitch of a slide is the median distance from each spot to its nearest
    neighbour; the lattice is ``"hex"`` when the typical spot has about six
    neighbours within 1.2 pitches (Visium), ``"square"`` when about four (legacy ST).

    Parameters
    ----------
    slides
        Training slides.

    Returns
    -------
    dict or None
        ``pitch_um``, ``spot_diameter_um``, ``kind``; None when no slide has µm per
        pixel and at least three spots.
    """
    from scipy.spatial import cKDTree

    pitch, diameter, neighbours = [], [], []
    for s in slides:
        m = meta(s)
        if not m.mpp or s.n_obs < 3:
            continue
        xy = np.asarray(s.obsm["spatial"], dtype=np.float64)
        tree = cKDTree(xy)
        d, _ = tree.query(xy, k=2)
        p = float(np.median(d[:, 1]))
        if p <= 0:
            continue
        counts = [len(n) - 1 for n in tree.query_ball_point(xy, r=1.2 * p)]
        pitch.append(p * m.mpp)
        diameter.append(m.spot_diameter_px * m.mpp)
        neighbours.append(float(np.median(counts)))
    if not pitch:
        return None
    return {
        "pitch_um": float(np.median(pitch)),
        "spot_diameter_um": float(np.median(diameter)),
        "kind": "hex" if np.median(neighbours) >= 5 else "square",
    }


def model_card(
    model: Any,
    training_slides: Sequence[Any],
    *,
    cv_metrics: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of a fitted model (without the file digests, which :func:`save_model` adds).

    Parameters
    ----------
    model
        A fitted method.
    training_slides
        The slides it was fitted on.
    cv_metrics
        Optional inner cross-validation metrics (e.g. leave-one-slide-out on the
        training slides).
    options
        How the model was trained (data, gene spec, command-line options...).

    Returns
    -------
    dict
        JSON-ready card; ``model`` holds :meth:`he2st.methods.base.Method.card_info`
        (encoders with the sha256 of their weights, field of view, training mpp).
    """
    from he2st import __version__

    if getattr(model, "genes", None) is None:
        raise He2stInputError(f"method {getattr(model, 'name', '?')!r} is not fitted: nothing to save")
    slides = list(training_slides)
    if not slides:
        raise He2stInputError("save_model: training_slides is empty; name the slides the model was fitted on")
    info = model.card_info()
    metas = [meta(s) for s in slides]
    training = {
        "slides": [
            {
                "slide_id": m.slide_id,
                "patient": m.patient,
                "n_spots": int(s.n_obs),
                "n_genes": int(s.n_vars),
                "mpp": m.mpp,
                "spot_diameter_px": m.spot_diameter_px,
                "image": os.path.basename(m.image_path) if m.image_path else None,
            }
            for m, s in zip(metas, slides)
        ],
        "patients": sorted({m.patient for m in metas}),
        "n_spots": int(sum(s.n_obs for s in slides)),
        # The default grid of `he2st predict` on an image: the training spots' lattice.
        "spots": training_spot_layout(slides),
    }
    return jsonable(
        {
            "format": "he2st-model-card",
            "card_format": CARD_FORMAT,
            "he2st_version": __version__,
            "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "method": model.name,
            "family": getattr(model, "family", ""),
            "paper": getattr(model, "paper", ""),
            "genes": list(model.genes),
            "n_genes": len(model.genes),
            "normalization": {"evaluation": info["normalization"], "training": info["train_normalization"]},
            "uncertainty": bool(getattr(getattr(model, "capabilities", None), "uncertainty", False)),
            "training": training,
            "model": info,
            "options": dict(options or {}),
            "cv_metrics": None if cv_metrics is None else dict(cv_metrics),
        }
    )


def _card_digest(card: Mapping[str, Any]) -> str:
    body = {k: v for k, v in card.items() if k not in ("card_sha256", "model_dir")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=json_default_or_str).encode()).hexdigest()


def check_model_dir(out_dir: str | os.PathLike) -> Path:
    """Check that a model may be saved to ``out_dir`` (new, empty, or a model folder to replace).

    Parameters
    ----------
    out_dir
        The model folder to be.

    Returns
    -------
    pathlib.Path
        ``out_dir`` as a path.

    Raises
    ------
    he2st.errors.He2stInputError
        ``out_dir`` is a file, or a non-empty folder that holds no model (it is
        never deleted).
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise He2stInputError(f"{str(out)!r} exists and is not a folder; choose another model folder")
        if any(out.iterdir()) and not ((out / CARD_FILE).is_file() or (out / DIGESTED[0]).is_file()):
            raise He2stInputError(
                f"{str(out)!r} is a non-empty folder that holds no he2st model; choose a new or empty folder"
            )
    return out


def save_model(
    model: Any,
    out_dir: str | os.PathLike,
    *,
    training_slides: Sequence[Any],
    cv_metrics: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Save a fitted model and its card into a model folder, atomically.

    Parameters
    ----------
    model
        A fitted method.
    out_dir
        The model folder. An existing model folder is replaced once the new one
        is complete; an existing folder that is not a model folder (and not
        empty) is refused, never deleted.
    training_slides
        The slides the model was fitted on (ids, patients, spots and
        microns per pixel go into the card).
    cv_metrics
        Optional inner cross-validation metrics stored in the card.
    options
        How the model was trained (stored in the card as ``options``).

    Returns
    -------
    pathlib.Path
        The model folder.

    Raises
    ------
    he2st.errors.He2stInputError
        An unfitted model, no training slides, or ``out_dir`` an unrelated non-empty folder.
    """
    out = check_model_dir(out_dir)
    card = model_card(model, training_slides, cv_metrics=cv_metrics, options=options)
    with atomic_dir(out) as tmp:
        model.save(tmp)
        card["files"] = {name: sha256_file(tmp / name) for name in DIGESTED}
        card["card_sha256"] = _card_digest(card)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, default=json_default_or_str) + "\n")
    return out


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The card of a model folder, checked for form (not for digests or version).

    Parameters
    ----------
    model_dir
        A folder written by :func:`save_model`.

    Returns
    -------
    dict
        The card.

    Raises
    ------
    ModelCardError
        The folder or its ``card.json`` is missing, unreadable or not a card.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelCardError(f"{str(path)!r} is not a folder; expected a model folder written by 'he2st train'")
    f = path / CARD_FILE
    if not f.is_file():
        hint = " (a bare Method.save folder: load it with he2st.methods.load_method)" if (path / DIGESTED[0]).is_file() else ""
        raise ModelCardError(f"{str(f)!r} does not exist: {str(path)!r} is not a he2st model folder{hint}")
    try:
        card = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ModelCardError(f"{str(f)!r} is not valid JSON ({exc}); expected the card 'he2st train' writes") from exc
    if not isinstance(card, dict) or card.get("format") != "he2st-model-card":
        raise ModelCardError(f"{str(f)!r} is not a he2st model card (no format 'he2st-model-card')")
    missing = [k for k in ("he2st_version", "method", "genes", "files", "card_format") if k not in card]
    if missing:
        raise ModelCardError(f"{str(f)!r} lacks keys {missing}; expected the card 'he2st train' writes")
    return card


def load_model(model_dir: str | os.PathLike, *, check_weights: bool = True) -> tuple[Any, dict[str, Any]]:
    """Load a model folder, verifying its card; returns ``(model, card)``.

    Parameters
    ----------
    model_dir
        A folder written by :func:`save_model` (or ``he2st train``).
    check_weights
        Check that each frozen encoder's weights file (needed again to compute
        features at prediction) still has the sha256 recorded at training.

    Returns
    -------
    model : he2st.methods.base.Method
        The fitted method (``model.he2st_card_`` holds the card).
    card : dict
        The card, with ``model_dir`` added.

    Raises
    ------
    ModelVersionError
        The folder was written by another he2st major.minor version.
    ModelTamperedError
        ``method.json`` or ``state.safetensors`` does not match the card's
        sha256, or the card disagrees with ``method.json`` (method, genes).
    he2st.errors.WeightsMismatchError
        A frozen encoder's weights file differs from the one trained with.
    ModelCardError
        No folder, no card, or a malformed one.
    """
    from he2st import __version__
    from he2st.methods import load_method

    path = Path(model_dir)
    card = read_card(path)
    if _major_minor(card["he2st_version"]) != _major_minor(__version__):
        raise ModelVersionError(
            f"{str(path)!r}: model saved by he2st {card['he2st_version']}, this is he2st {__version__}; "
            "models are read by the same major.minor version only: retrain it with 'he2st train' "
            f"or use he2st {'.'.join(_major_minor(card['he2st_version']))}.x"
        )
    files = card.get("files")
    if not isinstance(files, Mapping) or set(DIGESTED) - set(files):
        raise ModelCardError(f"{str(path / CARD_FILE)!r}: 'files' must give the sha256 of {list(DIGESTED)}")
    for name in DIGESTED:
        f = path / name
        if not f.is_file():
            raise ModelTamperedError(f"{str(f)!r} is missing: the model folder {str(path)!r} is incomplete")
        digest = sha256_file(f)
        if digest != files[name]:
            raise ModelTamperedError(
                f"{str(f)!r}: sha256 {digest[:12]}... does not match the card's {str(files[name])[:12]}...; "
                "the model was changed after it was saved (or damaged): retrain it or restore the folder"
            )
    if card.get("card_sha256") and card["card_sha256"] != _card_digest(card):
        raise ModelTamperedError(
            f"{str(path / CARD_FILE)!r} was edited after the model was saved (its content does not match card_sha256)"
        )
    model = load_method(path)
    if model.name != card["method"] or [str(g) for g in model.genes] != [str(g) for g in card["genes"]]:
        raise ModelTamperedError(
            f"{str(path / CARD_FILE)!r} describes method {card['method']!r} with {len(card['genes'])} genes, "
            f"but the folder holds {model.name!r} with {len(model.genes)} genes"
        )
    if check_weights:
        model.check_weights_identity()  # a frozen encoder's weights file must be the one trained with
    card = {**card, "model_dir": str(path)}
    model.he2st_card_ = card
    return model, card


