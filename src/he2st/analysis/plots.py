"""Plots of slides: spots drawn over the H&E image.

Matplotlib is imported inside the functions; callers running without a
display should select the ``Agg`` backend (the CLI does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from he2st.errors import He2stInputError


def plot_spots(
    slide: Any,
    ax: Any = None,
    color: str | np.ndarray | None = None,
    *,
    max_side: int = 1024,
    cmap: str = "viridis",
    alpha: float = 0.75,
    title: str | None = None,
    legend: bool = True,
) -> Any:
    """Draw a slide's spots, at their true size, over a thumbnail of its image.

    Parameters
    ----------
    slide
        A slide AnnData (``obsm["spatial"]`` in image pixels, ``uns["he2st"]``).
    ax
        Matplotlib axes; a new figure is made when None.
    color
        None: spot outlines only. A column of ``slide.obs`` (categorical ->
        one colour per category with a legend; numeric -> ``cmap``). A gene
        name: its ``log1p(CPM)`` (see :func:`he2st.pp.normalize.normalize`).
        Or an array of ``n_spots`` values.
    max_side
        Longest side of the thumbnail drawn under the spots (in pixels).
    cmap
        Colour map for numeric values.
    alpha
        Opacity of the spot fill.
    title
        Axes title; default the slide id (and what is coloured).
    legend
        Draw a legend (categories) or a colour bar (numbers).

    Returns
    -------
    matplotlib.axes.Axes
        Axes in full-resolution pixel coordinates (x right, y down).
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    from he2st.data.slide import meta

    m = meta(slide)
    xy = np.asarray(slide.obsm["spatial"], dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))

    width = height = None
    if m.image_path is not None:
        from he2st.image import open_image

        with open_image(m.image_path) as img:
            width, height = img.width, img.height
            thumb = img.thumbnail(max_side)
        # The extent puts the thumbnail in level-0 pixel coordinates, like the spots.
        ax.imshow(thumb, extent=(0, width, height, 0), interpolation="antialiased")

    values, kind, label = _colour_values(slide, color)
    d = np.full(len(xy), m.spot_diameter_px)
    if kind == "none":
        spots = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData,
                                  facecolors="none", edgecolors="black", linewidths=0.6)
        ax.add_collection(spots)
    elif kind == "category":
        cats = list(values.categories)
        palette = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        codes = np.asarray(values.codes)
        colours = np.array([palette(i % palette.N) for i in range(len(cats))] + [(0.6, 0.6, 0.6, 1.0)])
        face = colours[np.where(codes < 0, len(cats), codes)]
        face[:, 3] = alpha
        spots = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData,
                                  facecolors=face, edgecolors="none")
        ax.add_collection(spots)
        if legend:
            from matplotlib.patches import Patch

            handles = [Patch(color=colours[i], label=str(c)) for i, c in enumerate(cats)]
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    else:
        spots = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData,
                                  cmap=cmap, edgecolors="none", alpha=alpha)
        spots.set_array(np.asarray(values, dtype=float))
        ax.add_collection(spots)
        if legend:
            plt.colorbar(spots, ax=ax, fraction=0.046, pad=0.02, label=label)

    if width is None:
        pad = m.spot_diameter_px
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    else:
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else (m.slide_id + (f": {label}" if label else "")), fontsize=10)
    return ax


def _colour_values(slide: Any, color: str | np.ndarray | None) -> tuple[Any, str, str]:
    """(values, kind, label) with kind in none / category / number."""
    import pandas as pd

    if color is None:
        return None, "none", ""
    if isinstance(color, str):
        if color in slide.obs.columns:
            col = slide.obs[color]
            if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or col.dtype == bool:
                return pd.Categorical(col.astype(object).where(col.notna(), None)), "category", color
            return col.to_numpy(dtype=float), "number", color
        if color in slide.var_names:
            from he2st.pp.normalize import Normalizer

            values = Normalizer("cpm_log1p" if _is_counts(slide) else "raw").transform(slide, [color])[:, 0]
            return values, "number", f"{color} (log1p CPM)" if _is_counts(slide) else color
        raise He2stInputError(
            f"plot_spots: {color!r} is neither an obs column ({list(slide.obs.columns)}) nor a gene of the slide"
        )
    values = np.asarray(color)
    if values.shape != (slide.n_obs,):
        raise He2stInputError(
            f"plot_spots: color has shape {values.shape}, expected ({slide.n_obs},) (one value per spot)"
        )
    if values.dtype.kind in "biuf":
        return values.astype(float), "number", ""
    return pd.Categorical(values.astype(str)), "category", ""


def _is_counts(slide: Any) -> bool:
    from he2st.data.slide import meta

    return meta(slide).counts


__all__ = ["plot_spots"]
