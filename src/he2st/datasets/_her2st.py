"""The her2st cohort (Andersson et al., Nat Commun 2021): HER2+ breast cancer, ST v1 + H&E.

The data are read from a local copy of the ``almaan/her2st`` repository's ``data/``
folder (``ST-cnts/``, ``ST-spotfiles/``, ``ST-imgs/``, ``ST-pat/lbl/``); nothing is
downloaded. Section ids are ``<patient letter><section number>`` (``C2`` is patient C).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from he2st.datasets._paths import resolve_root
from he2st.errors import He2stInputError, InferredMppWarning
from he2st.io._common import require_file

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def her2st_root(root: str | os.PathLike | None = None) -> Path:
    """The her2st data folder: ``root``, ``$HE2ST_HER2ST_ROOT``, or ``../shared/data/her2st``.

    Parameters
    ----------
    root
        Folder given by the user (it must hold ``ST-cnts/``); None searches as
        :func:`resolve_root` does.

    Returns
    -------
    pathlib.Path
        The folder holding ``ST-cnts/``.
    """
    return resolve_root("her2st", root, "HE2ST_HER2ST_ROOT", "ST-cnts")


def her2st_sections(root: str | os.PathLike | None = None) -> dict[str, Path | None]:
    """Every section with a counts file, mapped to its H&E image (None when the image is absent).

    Parameters
    ----------
    root
        The her2st folder (see :func:`her2st_root`).

    Returns
    -------
    dict of str to pathlib.Path or None
        Section id (e.g. ``"C2"``) -> its image under ``ST-imgs/``, in sorted order.
    """
    base = her2st_root(root)
    sections = sorted(p.name[: -len(".tsv.gz")] for p in (base / "ST-cnts").glob("*.tsv.gz"))
    return {s: _image(base, s) for s in sections}


def her2st(
    root: str | os.PathLike | None = None,
    sections: list[str] | None = None,
    with_images_only: bool = True,
) -> Any:
    """Load the her2st cohort as a :class:`~he2st.data.Cohort`.

    Parameters
    ----------
    root
        The her2st ``data`` folder. Default: ``$HE2ST_HER2ST_ROOT``, else
        ``../shared/data/her2st`` relative to the working directory or the repository.
    sections
        Section ids to load (e.g. ``["C2", "C3"]``). Default: every section with
        counts (restricted to those with an H&E image when ``with_images_only``).
    with_images_only
        Keep only sections whose full-resolution H&E image is present. With False,
        sections without an image have ``image_path = None`` and the spot diameter
        and pixel size fitted from their spot grid (in the frame of their missing image).

    Returns
    -------
    Cohort
        Named ``"her2st"``; patient = first letter of the section id; pathologist
        labels in ``obs["label"]`` where a label file exists.

    Raises
    ------
    MissingFileError
        The data folder, or a section's spot file, is missing.
    He2stInputError
        An unknown section, or one without an image while ``with_images_only``.
    """
    from he2st._utils import progress
    from he2st.data import Cohort
    from he2st.io import read_st_legacy

    base = her2st_root(root)
    available = her2st_sections(base)
    if sections is None:
        chosen = [s for s, img in available.items() if img is not None or not with_images_only]
        if not chosen:
            raise He2stInputError(
                f"her2st folder {str(base)!r} has no section with an H&E image under ST-imgs/; "
                "use with_images_only=False for count-only sections"
            )
    else:
        chosen = list(sections)
        unknown = [s for s in chosen if s not in available]
        if unknown:
            raise He2stInputError(
                f"her2st folder {str(base)!r} has no sections {unknown}; available: {list(available)}"
            )
        if with_images_only:
            no_image = [s for s in chosen if available[s] is None]
            if no_image:
                raise He2stInputError(
                    f"her2st sections {no_image} have no H&E image in {str(base / 'ST-imgs')!r}; "
                    "pass with_images_only=False to load them without one"
                )
    slides = []
    inferred = []
    for sec in progress(chosen, description="reading her2st"):
        labels = base / "ST-pat" / "lbl" / f"{sec}_labeled_coordinates.tsv"
        # One warning for the cohort instead of one per section (the pixel size of
        # every section comes from the ST array lattice).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InferredMppWarning)
            slide = read_st_legacy(
                base / "ST-cnts" / f"{sec}.tsv.gz",
                base / "ST-spotfiles" / f"{sec}_selection.tsv",
                image=available[sec],
                labels=labels if labels.is_file() else None,
                slide_id=sec,
                patient=sec[0],
            )
        m = slide.uns["he2st"]
        if str(m.get("mpp_source", "")).startswith("lattice:"):
            inferred.append(f"{sec} {m['mpp']:.3f}")
        slides.append(slide)
    if inferred:
        warnings.warn(
            f"her2st: microns per pixel of {len(inferred)} sections inferred from the ST spot lattice "
            f"(see uns['he2st']['mpp_source']): {', '.join(inferred)} µm/px",
            InferredMppWarning,
            stacklevel=2,
        )
    return Cohort(slides, name="her2st")


def her2st_panel_path(root: str | os.PathLike | None = None) -> Path:
    """The file of the 785-gene her2st panel (``hist2st/her_hvg_cut_1000.npy``), checked to exist.

    Parameters
    ----------
    root
        The her2st folder (see :func:`her2st_root`).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    MissingFileError
        The file is missing.
    """
    return require_file(her2st_root(root) / "hist2st" / "her_hvg_cut_1000.npy", "her2st gene panel")


def her2st_panel(root: str | os.PathLike | None = None) -> list[str]:
    """The 785-gene her2st panel of Hist2ST/HisToGene/THItoGene (``hist2st/her_hvg_cut_1000.npy``).

    Parameters
    ----------
    root
        The her2st folder (see :func:`her2st_root`).

    Returns
    -------
    list of str
        Gene symbols, in the file's order.

    Raises
    ------
    MissingFileError, He2stInputError
        The file is missing or is not a 1-D array of gene symbols.
    """
    path = her2st_panel_path(root)
    try:
        genes = np.load(path, allow_pickle=False)  # a plain unicode array: no pickle needed
    except ValueError as exc:
        raise He2stInputError(f"{str(path)!r} is not a numpy array of gene symbols: {exc}") from exc
    if genes.dtype.kind not in "US" or genes.ndim != 1:
        raise He2stInputError(f"{str(path)!r}: expected a 1-D array of gene symbols, got {genes.dtype} {genes.shape}")
    return [str(g) for g in genes]


def _image(base: Path, section: str) -> Path | None:
    """The section's H&E image under ``ST-imgs/<patient>/<section>/``, if present."""
    folder = base / "ST-imgs" / section[0] / section
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.is_file())
    if len(found) > 1:
        names = [p.name for p in found]
        raise He2stInputError(f"her2st section {section!r}: several images in {str(folder)!r}: {names}")
    return found[0] if found else None
