"""Microns per pixel of an image file, read from its metadata (never guessed).

:func:`read_mpp` looks, in this order, at:

1. OpenSlide's ``openslide.mpp-x`` property, for the vendor formats OpenSlide
   opens (.svs, .ndpi, .mrxs, ...) when it is installed;
2. OME-XML ``Pixels/@PhysicalSizeX`` (+ ``PhysicalSizeXUnit``, default µm) of an
   OME-TIFF;
3. the Aperio ``ImageDescription`` string (``... |MPP = 0.2520| ...``), which
   also covers an .svs read with tifffile when OpenSlide is absent;
4. the baseline TIFF tags ``XResolution`` + ``ResolutionUnit`` (inch or
   centimetre).

Each value comes back with where it came from (``"file:aperio MPP"``, ...),
which readers record as ``uns["he2st"]["mpp_source"]``. JPEG and PNG files,
and TIFFs without any of these, give None: :func:`resolve_mpp` then asks the
caller to pass ``mpp=`` instead of assuming a pixel size.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from he2st.errors import ImageError, UnknownMppError
from he2st.image.lazy.formats import check_file, detect_format, openslide_module

#: Relative difference between a user's mpp and the file's above which :func:`resolve_mpp` warns.
MPP_MISMATCH = 0.05

#: Resolutions (dots per inch) written by image editors and libraries that know
#: nothing of the physical pixel size: 72 dpi is the historical Mac/Photoshop
#: default and 96 dpi the Windows one (Pillow and many converters copy them).
#: Taken literally they would mean 353 or 265 µm per pixel, which no microscope
#: produces, so such tags are treated as "no pixel size".
DEFAULT_DPIS = (72.0, 96.0)

#: Microns per unit of the OME ``PhysicalSizeXUnit`` values he2st understands.
_OME_UNITS = {
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,  # Greek mu
    "micron": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
    "pm": 1e-6,
}

_APERIO_MPP = re.compile(r"(?:^|\|)\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def mpp_from_openslide_properties(properties: Mapping[str, Any]) -> tuple[float, str] | None:
    """Microns per pixel from OpenSlide's slide properties.

    Parameters
    ----------
    properties
        ``OpenSlide.properties`` (a mapping of strings).

    Returns
    -------
    tuple of (float, str) or None
        ``(mpp, "file:openslide.mpp-x")``, or None when the property is absent or not positive.
    """
    v = _positive(properties.get("openslide.mpp-x"))
    return None if v is None else (v, "file:openslide.mpp-x")


def mpp_from_aperio_description(description: str | None) -> tuple[float, str] | None:
    """Microns per pixel from an Aperio ``ImageDescription`` string, whose fields include ``MPP = 0.252``.

    The string starts with ``Aperio`` and separates its fields with ``|``.

    Parameters
    ----------
    description
        The first page's ImageDescription tag.

    Returns
    -------
    tuple of (float, str) or None
        ``(mpp, "file:aperio MPP")``, or None when the string is not Aperio's or has no positive MPP.
    """
    if not description or not description.lstrip().startswith("Aperio"):
        return None
    m = _APERIO_MPP.search(description)
    v = None if m is None else _positive(m.group(1))
    return None if v is None else (v, "file:aperio MPP")


def mpp_from_ome_xml(xml: str | None) -> tuple[float, str] | None:
    """Microns per pixel from OME-XML: ``PhysicalSizeX`` of the first ``Pixels`` element, in its unit.

    Parameters
    ----------
    xml
        The OME-XML text (an OME-TIFF's ImageDescription).

    Returns
    -------
    tuple of (float, str) or None
        ``(mpp, "file:OME PhysicalSizeX")``, or None when absent, not positive, or in
        a unit that is not a length.
    """
    if not xml:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        v = _positive(el.get("PhysicalSizeX"))
        if v is None:
            return None
        unit = el.get("PhysicalSizeXUnit", "µm").strip()
        factor = _OME_UNITS.get(unit)
        if factor is None:
            return None
        return v * factor, "file:OME PhysicalSizeX"
    return None


def mpp_from_tiff_resolution(x_resolution: Any, unit: Any) -> tuple[float, str] | None:
    """Microns per pixel from the TIFF ``XResolution`` (pixels per unit) and ``ResolutionUnit`` tags.

    Unit 1 (none) carries no physical size, and 72 or 96 pixels per inch are the
    defaults of software that does not know it (see :data:`DEFAULT_DPIS`): both give None.

    Parameters
    ----------
    x_resolution
        The tag value: a number or a ``(numerator, denominator)`` rational.
    unit
        ``ResolutionUnit``: 2 (or ``"inch"``) or 3 (or ``"centimeter"``); anything else gives None.

    Returns
    -------
    tuple of (float, str) or None
        ``(mpp, "file:TIFF XResolution (inch)")`` or ``(..., "(cm)")``, or None.
    """
    if isinstance(x_resolution, (tuple, list)) and len(x_resolution) == 2:
        num, den = (_positive(v) for v in x_resolution)
        res = None if num is None or den is None else num / den
    else:
        res = _positive(x_resolution)
    if res is None:
        return None
    u = getattr(unit, "value", unit)
    u = str(u).strip().lower() if isinstance(u, str) else u
    if u in (2, "2", "inch"):
        if any(abs(res - d) < 1e-6 for d in DEFAULT_DPIS):
            return None
        return 25_400.0 / res, "file:TIFF XResolution (inch)"
    if u in (3, "3", "centimeter", "cm"):
        return 10_000.0 / res, "file:TIFF XResolution (cm)"
    return None


def _tiff_mpp(path: Path) -> tuple[float, str] | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            if tf.is_ome:
                found = mpp_from_ome_xml(tf.ome_metadata)
                if found is not None:
                    return found
            found = mpp_from_aperio_description(page.description)
            if found is not None:
                return found
            tags = page.tags
            xres = tags.get("XResolution")
            unit = tags.get("ResolutionUnit")
            if xres is None:
                return None
            return mpp_from_tiff_resolution(xres.value, 2 if unit is None else unit.value)
    except Exception as exc:  # tifffile raises many types for a damaged file
        raise ImageError(f"{str(path)!r} is not a readable TIFF image: {exc}") from exc


def read_mpp(path: str | os.PathLike) -> tuple[float, str] | None:
    """Microns per pixel recorded in an image file, and where it was found.

    Parameters
    ----------
    path
        An image: TIFF, OME-TIFF, Aperio SVS, a vendor format (OpenSlide), JPEG, PNG.

    Returns
    -------
    tuple of (float, str) or None
        ``(mpp, source)`` with ``source`` one of ``"file:openslide.mpp-x"``,
        ``"file:OME PhysicalSizeX"``, ``"file:aperio MPP"``,
        ``"file:TIFF XResolution (inch)"``, ``"file:TIFF XResolution (cm)"``; None
        when the file records no pixel size (JPEG, PNG, a TIFF without the tags,
        or a TIFF at a 72/96 dpi software default).

    Raises
    ------
    ImageError
        The file is missing or not a readable image.
    """
    p = check_file(path)
    fmt = detect_format(p)
    if fmt == "openslide":
        try:
            openslide = openslide_module()
        except ImageError:
            openslide = None
        if openslide is not None:
            try:
                with openslide.OpenSlide(str(p)) as s:
                    found = mpp_from_openslide_properties(s.properties)
            except Exception as exc:  # openslide raises its own error types
                raise ImageError(f"{str(p)!r} is not a readable whole-slide image: {exc}") from exc
            if found is not None:
                return found
        # Without OpenSlide, TIFF-based vendor files (.svs, .ndpi, .scn, .bif) still have readable tags.
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_mpp(p)
        return None
    if fmt == "tiff":
        return _tiff_mpp(p)
    return None


def resolve_mpp(path: str | os.PathLike, mpp: float | None = None) -> tuple[float, str]:
    """The microns per pixel to use for an image: the caller's, else the file's; never a guess.

    Parameters
    ----------
    path
        The image file.
    mpp
        The caller's value, which wins when given (source ``"user"``).

    Returns
    -------
    tuple of (float, str)
        ``(mpp, source)``.

    Raises
    ------
    UnknownMppError
        Neither the caller nor the file gives a pixel size; the message says how to pass one.
    ImageError
        The file is missing or unreadable, or ``mpp`` is not a positive number.

    Warns
    -----
    UserWarning
        The caller's value differs from the file's by more than 5 %.
    """
    p = Path(path)
    found = read_mpp(p)
    if mpp is not None:
        user = _positive(mpp)
        if user is None or isinstance(mpp, bool):
            raise ImageError(f"{str(p)!r}: mpp must be a positive number of microns per pixel, got {mpp!r}")
        if found is not None and abs(user - found[0]) > MPP_MISMATCH * found[0]:
            warnings.warn(
                f"{str(p)!r}: mpp={user:g} µm/px given, but the file records {found[0]:g} µm/px "
                f"({found[1]}); using the given value",
                UserWarning,
                stacklevel=3,
            )
        return user, "user"
    if found is None:
        raise UnknownMppError(
            f"{str(p)!r} records no pixel size (microns per pixel): pass it as mpp=<µm per pixel> "
            "(he2st CLI: --mpp), e.g. mpp=0.5 for a 20x scan; it is never guessed"
        )
    return found
