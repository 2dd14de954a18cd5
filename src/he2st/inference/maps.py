"""Maps: one PNG per gene, the predicted values as spots over the slide's H&E thumbnail."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_path
from he2st.errors import GenePanelError
from he2st.inference.output import PREDICTION_KEY


def check_map_genes(pred: Any, genes: Sequence[str] | str) -> list[str]:
    """The genes asked for, checked against a prediction's genes.

    Parameters
    ----------
    pred
        A prediction AnnData (:func:`he2st.inference.predict`) or anything with
        ``var_names`` (a fitted model's ``genes`` list works too).
    genes
        Gene names, or one comma-separated string.

    Returns
    -------
    list of str
        The genes, in the order given, duplicates dropped.

    Raises
    ------
    he2st.errors.GenePanelError
        No gene given, or genes the prediction does not have (the message lists
        some it has).
    """
    if isinstance(genes, str):
        genes = [g.strip() for g in genes.split(",")]
    wanted = list(dict.fromkeys(str(g) for g in genes if str(g).strip()))
    known = [str(g) for g in (pred.var_names if hasattr(pred, "var_names") else pred)]
    if not wanted:
        raise GenePanelError(f"maps: no gene named; the model predicts e.g. {known[:8]}")
    have = set(known)
    unknown = [g for g in wanted if g not in have]
    if unknown:
        lower = {g.lower(): g for g in known}
        close = [lower[g.lower()] for g in unknown if g.lower() in lower]
        hint = f" (case differs: {close[:5]})" if close else ""
        raise GenePanelError(
            f"maps: gene(s) {unknown[:10]} are not predicted by the model{hint}; "
            f"it predicts {len(known)} genes, e.g. {known[:8]}"
        )
    return wanted


def _safe_name(gene: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", gene) or "_"


def plot_maps(
    pred: Any,
    genes: Sequence[str] | str,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "",
    layer: str | None = None,
    dpi: int = 120,
    cmap: str = "viridis",
) -> list[Path]:
    """Write one PNG per gene: its predicted values as spots over the H&E thumbnail.

    Parameters
    ----------
    pred
        A prediction AnnData (:func:`he2st.inference.predict`): ``obsm["spatial"]``
        and ``uns["spatial"]`` (thumbnail and scale factors).
    genes
        Genes to draw (a list, or one comma-separated string); every one is
        checked before anything is written.
    out_dir
        Folder for the files ``<prefix><gene>.png`` (created if missing).
    prefix
        Start of each file name (e.g. ``"pred_"``).
    layer
        Draw ``layers[layer]`` (e.g. ``"sd"``) instead of ``X``.
    dpi
        Resolution of the PNGs.
    cmap
        Matplotlib colour map.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of ``genes``; each is written atomically.

    Raises
    ------
    he2st.errors.GenePanelError
        Unknown genes (nothing is written).
    he2st.errors.He2stInputError
        An unknown layer.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from he2st.errors import He2stInputError

    wanted = check_map_genes(pred, genes)
    if layer is not None and layer not in pred.layers:
        raise He2stInputError(f"maps: the prediction has no layer {layer!r}; layers: {sorted(pred.layers)}")
    values = pred.layers[layer] if layer is not None else pred.X
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float64)
    info = dict(pred.uns.get(PREDICTION_KEY, {}))
    lib_id = info.get("library_id")
    libs = pred.uns.get("spatial", {}) or {}
    lib = libs.get(lib_id) if lib_id in libs else (next(iter(libs.values())) if libs else {})
    image = (lib.get("images") or {}).get("hires")
    sf = lib.get("scalefactors") or {}
    scale = float(sf.get("tissue_hires_scalef", 1.0)) if image is not None else 1.0
    xy = np.asarray(pred.obsm["spatial"], dtype=np.float64) * scale
    diameter = float(sf.get("spot_diameter_fullres", 1.0)) * scale
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = {g: i for i, g in enumerate(map(str, pred.var_names))}
    what = f"sd ({layer})" if layer else str(info.get("scale", ""))
    written = []
    for gene in wanted:
        v = values[:, idx[gene]]
        fig, ax = plt.subplots(figsize=(6, 6))
        if image is not None:
            ax.imshow(np.asarray(image))
        # Marker size in points^2 from the spot diameter in thumbnail pixels (axes drawn in pixels).
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, cmap=cmap, s=_marker_size(ax, fig, diameter, xy, image), linewidths=0, alpha=0.85)
        if image is None:
            ax.invert_yaxis()
            ax.set_aspect("equal")
        ax.set_axis_off()
        title = f"{info.get('slide_id', '')}: {gene}" + (f" ({what})" if what else "")
        ax.set_title(title.strip(": "))
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        path = out_dir / f"{prefix}{_safe_name(gene)}.png"
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        finally:
            plt.close(fig)
        written.append(path)
    return written


def _marker_size(ax: Any, fig: Any, diameter_px: float, xy: np.ndarray, image: Any) -> float:
    """Scatter size (points^2) of a disc ``diameter_px`` data pixels wide, for the axes' extent."""
    if image is not None:
        h, w = np.asarray(image).shape[:2]
        extent = max(w, h)
    else:
        extent = float(np.ptp(xy, axis=0).max() + diameter_px) if len(xy) else 1.0
    axes_in = min(ax.get_position().width * fig.get_figwidth(), ax.get_position().height * fig.get_figheight())
    d_points = diameter_px / max(extent, 1e-9) * axes_in * 72.0
    return float(max(d_points, 1.0) ** 2)
