"""``he2st predict`` as a function: read a slide (H&E image or .h5ad), predict, write the AnnData, tables and maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_path
from he2st.errors import He2stInputError

#: Table formats of :func:`export_table`.
TABLE_FORMATS = ("csv", "parquet")


def export_table(pred: Any, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write a prediction's matrix as a table for tools outside Python: one row per spot.

    Columns: ``spot_id``, ``slide``, ``x``, ``y`` (full-resolution pixels),
    ``array_row``, ``array_col``, then one column per gene.

    Parameters
    ----------
    pred
        A prediction AnnData (:func:`he2st.inference.predict`).
    path
        The file to write (atomically).
    fmt
        ``"csv"`` or ``"parquet"``; default from the file's suffix.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    he2st.errors.He2stInputError
        An unknown format.
    """
    import pandas as pd

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in TABLE_FORMATS:
        raise He2stInputError(f"{str(path)!r}: table format {fmt!r} unknown; use one of {list(TABLE_FORMATS)}")
    xy = np.asarray(pred.obsm["spatial"], dtype=np.float64)
    X = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
    front = pd.DataFrame({"spot_id": pred.obs_names.astype(str)})
    if "slide" in pred.obs:
        front["slide"] = pred.obs["slide"].astype(str).to_numpy()
    front["x"], front["y"] = xy[:, 0], xy[:, 1]
    for col in ("array_row", "array_col"):
        if col in pred.obs:
            front[col] = pred.obs[col].to_numpy()
    values = pd.DataFrame(np.asarray(X, dtype=np.float32), columns=[str(g) for g in pred.var_names])
    clash = sorted(set(front.columns) & set(values.columns))
    if clash:
        values = values.rename(columns={c: f"gene:{c}" for c in clash})
    df = pd.concat([front, values], axis=1)
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return path


def read_input(
    path: str | os.PathLike, *, spots: Any = None, grid_um: Any = None, mpp: float | None = None,
    card: dict[str, Any] | None = None,
) -> Any:
    """The slide to predict: an ``.h5ad`` slide, or an H&E image with a spot table or a generated grid.

    Parameters
    ----------
    path
        A ``.h5ad`` file (read with :func:`he2st.io.read_h5ad`; its counts, if
        any, are ignored by prediction) or an H&E image (read with
        ``he2st.io.read_image`` as an image-only slide).
    spots
        Image only: a spot table (CSV with spot id and x, y pixel columns).
    grid_um
        Image only: spacing in micrometres of a generated spot grid (hexagonal),
        or a grid specification ``{"pitch_um", "spot_diameter_um", "kind"}``.
    mpp
        Microns per pixel of the image (when the file does not record it).
    card
        The model card: an image given without ``spots`` or ``grid_um`` is read on
        a grid like the training spots (:func:`default_grid`).

    Returns
    -------
    anndata.AnnData
        The slide.

    Raises
    ------
    he2st.errors.He2stInputError
        Spots or grid given for an .h5ad, both given, or neither given for an
        image and no training spot layout to default to (the image reader's own
        errors: no µm per pixel, no tissue, spots outside the image).
    """
    path = Path(path)
    if path.suffix.lower() == ".h5ad":
        if spots is not None or grid_um is not None:
            raise He2stInputError(f"{str(path)!r}: --spots and --grid-um apply to an H&E image, not to an .h5ad slide")
        from he2st.io import read_h5ad

        return read_h5ad(path, mpp=mpp)
    if spots is not None and grid_um is not None:
        raise He2stInputError(f"{str(path)!r}: give --spots or --grid-um, not both")
    if spots is None and grid_um is None:
        grid_um = default_grid(card or {}, path)
    from he2st.io import read_image

    kwargs: dict[str, Any] = {"mpp": mpp}
    if spots is not None:
        kwargs["spots"] = spots
    if grid_um is not None:
        kwargs["grid"] = grid_um
    return read_image(path, **kwargs)


def default_grid(card: dict[str, Any], input_path: str | os.PathLike) -> dict[str, Any]:
    """The grid of an image given without ``--spots`` or ``--grid-um``: the model's training spots.

    Parameters
    ----------
    card
        The model card (:func:`he2st.inference.load_model`).
    input_path
        The image, named in the error.

    Returns
    -------
    dict
        ``pitch_um``, ``spot_diameter_um`` and ``kind`` of the training spots.

    Raises
    ------
    he2st.errors.He2stInputError
        The card records no training spot layout (training slides without µm per pixel).
    """
    layout = (card.get("training") or {}).get("spots")
    if not layout:
        raise He2stInputError(
            f"{str(input_path)!r}: give the spots (--spots CSV or --grid-um N; in Python he2st.io.read_image(path, "
            "spots=... or grid=...)); the model has no card recording a training spot layout to default to (a model "
            "not saved with save_model, or training slides without µm per pixel)"
        )
    return {"pitch_um": float(layout["pitch_um"]), "spot_diameter_um": float(layout["spot_diameter_um"]),
            "kind": str(layout["kind"])}


def predict_file(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spots: Any = None,
    grid_um: float | None = None,
    mpp: float | None = None,
    maps: Sequence[str] | str | None = None,
    table: str | None = None,
    uncertainty: bool = True,
    thumbnail_max_side: int | None = None,
) -> dict[str, Any]:
    """Everything ``he2st predict`` does: load the model, read the slide, predict, write the outputs.

    Every option is checked (model folder and its card, map genes, formats)
    before the slide is read; each file is written atomically.

    Parameters
    ----------
    model_dir
        A model folder (``he2st train``; verified with :func:`he2st.inference.load_model`).
    input_path
        An H&E image or an ``.h5ad`` slide (see :func:`read_input`).
    out
        The prediction ``.h5ad`` to write.
    spots, grid_um, mpp
        See :func:`read_input`.
    maps
        Genes to draw (list or comma-separated): ``<out stem>_<gene>.png`` next to ``out``.
    table
        ``"csv"`` or ``"parquet"``: also write the matrix as ``<out stem>.<format>``.
    uncertainty
        Store the method's sd in ``layers["sd"]`` when it has one.
    thumbnail_max_side
        Longer side of the stored H&E thumbnail (default 2000 pixels).

    Returns
    -------
    dict
        ``prediction`` (the AnnData), ``h5ad``, ``table`` (or None), ``maps``
        (paths) and ``card`` (the model card).

    Raises
    ------
    he2st.errors.He2stInputError
        A bad option, model folder, input file or gene name; nothing is written then.
    """
    from he2st.inference.card import load_model
    from he2st.inference.core import predict
    from he2st.inference.maps import check_map_genes, plot_maps
    from he2st.inference.output import THUMBNAIL_MAX_SIDE, write_h5ad

    out = Path(out)
    if out.suffix.lower() != ".h5ad":
        raise He2stInputError(f"--out {str(out)!r}: the prediction is written as AnnData; give a file name ending in .h5ad")
    if table is not None and table.lower() not in TABLE_FORMATS:
        raise He2stInputError(f"table format {table!r} unknown; use one of {list(TABLE_FORMATS)}")
    if not Path(input_path).exists():
        raise He2stInputError(f"{str(input_path)!r} does not exist; expected an H&E image or an .h5ad slide")
    model, card = load_model(model_dir)
    genes = check_map_genes(model.genes, maps) if maps else []
    slide = read_input(input_path, spots=spots, grid_um=grid_um, mpp=mpp, card=card)
    pred = predict(model, slide, uncertainty=uncertainty,
                   thumbnail_max_side=THUMBNAIL_MAX_SIDE if thumbnail_max_side is None else thumbnail_max_side)
    pred.uns["he2st_prediction"]["input"] = str(input_path)
    write_h5ad(pred, out)
    table_path = export_table(pred, out.with_suffix(f".{table.lower()}")) if table else None
    written = plot_maps(pred, genes, out.parent, prefix=f"{out.stem}_") if genes else []
    return {"prediction": pred, "h5ad": out, "table": table_path, "maps": written, "card": card}
