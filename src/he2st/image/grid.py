"""Spot lattices laid over an H&E image, for predicting where nothing was sequenced.

:func:`make_grid` places a hexagonal (Visium-like) or square lattice of spots,
``pitch_um`` apart, over an image and keeps the spots whose disc is mostly
tissue. Any pitch works: a pitch below the one a model was trained at gives a
finer ("super-resolution") map, the patches then overlapping.

Geometry, in level-0 pixels with ``p = pitch_um / mpp``:

- square: centres ``(p/2 + c p, p/2 + r p)``; ``array_row = r``, ``array_col = c``;
- hex: rows ``p sqrt(3)/2`` apart (``y = p/2 + r p sqrt(3)/2``), odd rows shifted
  by ``p/2`` (``x = p/2 + c p + (r mod 2) p/2``), and, as in Visium,
  ``array_col = 2c + (r mod 2)`` so that neighbours along a row differ by 2.

Only centres inside the image are kept. Tissue is found on a thumbnail with
the slide's saturation threshold (log-Otsu, :func:`he2st.image.tissue.slide_tissue_threshold`,
kept within [0.05, 0.15] so that an all-glass or all-tissue image is not split in two);
a spot's tissue fraction is the share of its disc (on the thumbnail) that is
tissue, the part of a disc outside the image counting as glass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from he2st.errors import He2stInputError, ImageError

#: Spot diameter / pitch of Visium (55 µm spots, 100 µm apart): the default spot size of a grid.
VISIUM_DIAMETER_RATIO = 0.55

KINDS = ("hex", "square")

#: Range the slide's saturation cut is clipped to before tissue is called (see :func:`disc_tissue_fraction`).
MIN_TISSUE_CUT = 0.05
MAX_TISSUE_CUT = 0.15


@dataclass(frozen=True)
class GridSpec:
    """A lattice of spots in microns: what :func:`make_grid` lays over an image.

    Parameters
    ----------
    pitch_um
        Centre-to-centre distance of neighbouring spots, in µm.
    spot_diameter_um
        Spot diameter in µm; None: ``0.55 * pitch_um`` (Visium's ratio).
    kind
        ``"hex"`` (Visium-like) or ``"square"``.
    """

    pitch_um: float
    spot_diameter_um: float | None = None
    kind: str = "hex"

    def __post_init__(self) -> None:
        for name in ("pitch_um", "spot_diameter_um"):
            v = getattr(self, name)
            if v is None and name == "spot_diameter_um":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
                math.isfinite(float(v)) and float(v) > 0
            ):
                raise He2stInputError(f"grid: {name} must be a positive number of microns, got {v!r}")
        if self.kind not in KINDS:
            raise He2stInputError(f"grid: kind must be one of {list(KINDS)}, got {self.kind!r}")

    @property
    def diameter_um(self) -> float:
        """The spot diameter in µm (the default applied)."""
        if self.spot_diameter_um is not None:
            return float(self.spot_diameter_um)
        return VISIUM_DIAMETER_RATIO * float(self.pitch_um)

    @classmethod
    def coerce(cls, value: Any) -> GridSpec:
        """A :class:`GridSpec` from itself, a dict of its fields, or a bare pitch in µm (hex).

        Parameters
        ----------
        value
            ``GridSpec``, ``{"pitch_um": 100, "spot_diameter_um": 55, "kind": "hex"}``,
            an object with those attributes, or a number (the pitch).

        Returns
        -------
        GridSpec
            The lattice.

        Raises
        ------
        He2stInputError
            Unknown keys, a missing pitch, or invalid values.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return cls(pitch_um=float(value))
        if isinstance(value, dict):
            unknown = set(value) - {"pitch_um", "spot_diameter_um", "kind"}
            if unknown or "pitch_um" not in value:
                raise He2stInputError(
                    f"grid: expected keys pitch_um (required), spot_diameter_um, kind; got {sorted(value)}"
                )
            return cls(**value)
        if hasattr(value, "pitch_um"):
            return cls(
                pitch_um=value.pitch_um,
                spot_diameter_um=getattr(value, "spot_diameter_um", None),
                kind=getattr(value, "kind", "hex"),
            )
        raise He2stInputError(
            f"grid: expected a pitch in µm, a dict {{'pitch_um': 100, 'kind': 'hex'}} or a GridSpec, got {value!r}"
        )


@dataclass(frozen=True)
class GridSpots:
    """The spots :func:`make_grid` kept.

    Parameters
    ----------
    xy
        ``float64 (n, 2)`` pixel centres (x = column, y = row) in level-0 pixels.
    array_row, array_col
        ``int64 (n,)`` lattice indices (hex: Visium's doubled columns).
    ids
        Spot ids ``"<array_row>x<array_col>"``.
    pitch_px, spot_diameter_px
        Pitch and spot diameter in level-0 pixels.
    kind
        ``"hex"`` or ``"square"``.
    tissue_fraction
        ``float32 (n,)`` share of each spot's disc that is tissue, or None when
        tissue was not looked at (``tissue_only=False``).
    """

    xy: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    ids: list[str]
    pitch_px: float
    spot_diameter_px: float
    kind: str
    tissue_fraction: np.ndarray | None

    def __len__(self) -> int:
        return len(self.ids)


def lattice(width: int, height: int, pitch_px: float, kind: str = "hex") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every lattice centre inside a ``width x height`` image (see the module notes for the geometry).

    Parameters
    ----------
    width, height
        Image size in pixels.
    pitch_px
        Centre-to-centre distance in pixels.
    kind
        ``"hex"`` or ``"square"``.

    Returns
    -------
    tuple of numpy.ndarray
        ``xy`` float64 ``(n, 2)``, ``array_row`` and ``array_col`` int64 ``(n,)``,
        row-major (top row first, left to right).
    """
    if kind not in KINDS:
        raise He2stInputError(f"grid: kind must be one of {list(KINDS)}, got {kind!r}")
    p = float(pitch_px)
    row_step = p * math.sqrt(3.0) / 2.0 if kind == "hex" else p
    n_rows = max(0, math.ceil((height - p / 2.0) / row_step))
    n_cols = max(0, math.ceil((width - p / 2.0) / p))
    r, c = np.meshgrid(np.arange(n_rows, dtype=np.int64), np.arange(n_cols, dtype=np.int64), indexing="ij")
    r, c = r.ravel(), c.ravel()
    shift = (r % 2) * (p / 2.0) if kind == "hex" else np.zeros(len(r))
    x = p / 2.0 + c * p + shift
    y = p / 2.0 + r * row_step
    inside = (x < width) & (y < height)
    col = 2 * c + (r % 2) if kind == "hex" else c
    return np.column_stack([x, y])[inside], r[inside], col[inside]


def _open(image_or_path: Any) -> Any:
    if isinstance(image_or_path, (str, os.PathLike)):
        from he2st.image.lazy import open_image

        return open_image(image_or_path)
    return image_or_path


def _size_and_thumbnail(img: Any, max_side: int) -> tuple[int, int, np.ndarray | None, str]:
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ImageError(f"grid: expected an RGB image (h, w, 3), got an array of shape {img.shape}")
        h, w = img.shape[:2]
        thumb = img
        if max(h, w) > max_side:
            from he2st.image.lazy.pixels import resize

            f = max_side / max(h, w)
            thumb = resize(img, max(1, round(w * f)), max(1, round(h * f)))
        return int(w), int(h), thumb, "the image array"
    name = repr(str(getattr(img, "path", "image")))
    return int(img.width), int(img.height), None, name


def make_grid(
    image_or_path: Any,
    *,
    mpp: float,
    pitch_um: float,
    spot_diameter_um: float | None = None,
    kind: str = "hex",
    tissue_only: bool = True,
    min_tissue: float = 0.5,
    thumbnail_px: int = 2048,
) -> GridSpots:
    """Lay a spot lattice over an image, keeping the spots that lie on tissue.

    Parameters
    ----------
    image_or_path
        The image: a path, a :class:`~he2st.image.LazyImage`, or a ``uint8 (h, w, 3)`` array.
    mpp
        Microns per level-0 pixel of the image.
    pitch_um
        Centre-to-centre distance of the spots in µm (any value: below the
        training pitch it gives overlapping spots and a finer map).
    spot_diameter_um
        Spot diameter in µm; None: ``0.55 * pitch_um`` (Visium's ratio).
    kind
        ``"hex"`` (Visium-like) or ``"square"``.
    tissue_only
        Keep only spots whose disc is at least ``min_tissue`` tissue; False keeps
        every lattice point inside the image.
    min_tissue
        Minimum share of a spot's disc that must be tissue, in [0, 1].
    thumbnail_px
        Longer side of the thumbnail tissue is detected on.

    Returns
    -------
    GridSpots
        Centres, lattice indices, ids, sizes and tissue fractions of the kept spots.

    Raises
    ------
    He2stInputError
        Invalid pitch, diameter, mpp, kind or ``min_tissue``; a pitch so large that
        no lattice point fits in the image.
    ImageError
        The image is unreadable, or (with ``tissue_only``) no spot lies on tissue.
    """
    spec = GridSpec(pitch_um=pitch_um, spot_diameter_um=spot_diameter_um, kind=kind)
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.integer, np.floating)) or not (
        math.isfinite(float(mpp)) and float(mpp) > 0
    ):
        raise He2stInputError(f"grid: mpp must be a positive number of microns per pixel, got {mpp!r}")
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise He2stInputError(f"grid: min_tissue must lie in [0, 1], got {min_tissue!r}")
    img = _open(image_or_path)
    width, height, thumb, name = _size_and_thumbnail(img, int(thumbnail_px))
    pitch_px = float(spec.pitch_um) / float(mpp)
    diameter_px = spec.diameter_um / float(mpp)
    xy, rows, cols = lattice(width, height, pitch_px, spec.kind)
    if len(xy) == 0:
        raise He2stInputError(
            f"grid: a pitch of {spec.pitch_um:g} µm ({pitch_px:.1f} px at {float(mpp):g} µm/px) leaves no "
            f"spot inside the {width}x{height} image {name}"
        )
    frac = None
    if tissue_only:
        if thumb is None:
            thumb = img.thumbnail(int(thumbnail_px))
        frac = disc_tissue_fraction(thumb, xy, diameter_px, (width, height))
        keep = frac >= float(min_tissue)
        if not keep.any():
            raise ImageError(
                f"{name}: no tissue found under any of the {len(xy)} grid spots (best spot "
                f"{float(frac.max()):.0%} tissue, {min_tissue:.0%} required); the image looks tissue-free. "
                "Check the file, lower min_tissue, or pass tissue_only=False to tile the whole image"
            )
        xy, rows, cols, frac = xy[keep], rows[keep], cols[keep], frac[keep]
    return GridSpots(
        xy=xy.astype(np.float64),
        array_row=rows.astype(np.int64),
        array_col=cols.astype(np.int64),
        ids=[f"{r}x{c}" for r, c in zip(rows.tolist(), cols.tolist())],
        pitch_px=pitch_px,
        spot_diameter_px=diameter_px,
        kind=spec.kind,
        tissue_fraction=frac,
    )


def disc_tissue_fraction(
    thumbnail: np.ndarray, xy: np.ndarray, diameter_px: float, size: tuple[int, int]
) -> np.ndarray:
    """Share of each spot's disc that is tissue, measured on a thumbnail.

    Parameters
    ----------
    thumbnail
        ``uint8 (th, tw, 3)`` RGB thumbnail of the whole image.
    xy
        ``(n, 2)`` spot centres in level-0 pixels.
    diameter_px
        Spot diameter in level-0 pixels.
    size
        ``(width, height)`` of level 0.

    Returns
    -------
    numpy.ndarray
        ``float32 (n,)`` in [0, 1]; the part of a disc outside the image counts as glass.
    """
    from scipy.signal import fftconvolve

    from he2st.image.tissue import saturation, slide_tissue_threshold

    th, tw = thumbnail.shape[:2]
    sx, sy = tw / float(size[0]), th / float(size[1])
    # Otsu always splits in two, even an image that is all glass or all tissue (a
    # crop), and then cuts through the noise of the one class there is. The cut is
    # therefore kept within the range of real slides' cuts: above 0.05 (the
    # white-glass cut is 0.055 on the her2st JPEGs, see he2st.image.tissue; the
    # saturation of noisy white glass stays below it) and at most 0.15 (the pink-
    # tinted slides' 0.11-0.135; stained tissue lies above it).
    cut = float(np.clip(slide_tissue_threshold(thumbnail), MIN_TISSUE_CUT, MAX_TISSUE_CUT))
    tissue = (saturation(thumbnail) > cut).astype(np.float64)
    radius = 0.5 * diameter_px * 0.5 * (sx + sy)
    rr = max(0, math.floor(radius))
    off = np.arange(-rr, rr + 1)
    disc = ((off[:, None] ** 2 + off[None, :] ** 2) <= max(radius, 0.5) ** 2).astype(np.float64)
    if disc.size == 1:
        share = tissue
    else:
        share = fftconvolve(tissue, disc, mode="same") / disc.sum()
    ix = np.clip(np.floor(xy[:, 0] * sx).astype(np.int64), 0, tw - 1)
    iy = np.clip(np.floor(xy[:, 1] * sy).astype(np.int64), 0, th - 1)
    return np.clip(share[iy, ix], 0.0, 1.0).astype(np.float32)
