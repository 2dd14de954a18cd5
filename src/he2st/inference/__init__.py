"""Inference: a fitted model on a new H&E slide, and the files the ecosystem reads as they are.

::

    import he2st
    model, card = he2st.inference.load_model("model/")
    pred = he2st.predict(model, slide)          # AnnData: X predicted, uns["spatial"] thumbnail
    scanpy.pl.spatial(pred, color="ERBB2")      # or squidpy.pl.spatial_scatter(pred, color=...)

- :func:`predict` (also ``he2st.predict``): predictions of one slide (sequenced
  or image-only) as an AnnData laid out like a scanpy/squidpy Visium object.
- :func:`prediction_adata`: that AnnData from arrays (the benchmark runner's
  prediction files use it too).
- :func:`save_model` / :func:`load_model`: a model folder with its ``card.json``
  (training slides, genes, scales, encoders and weights, field of view,
  version, digests), verified on load.
- :func:`plot_maps`: one PNG per gene over the slide's thumbnail.
- :func:`predict_file`: what ``he2st predict`` does (read, predict, write, export, maps).
"""

from __future__ import annotations

from he2st._utils import lazy_exports

_EXPORTS = {
    "predict": "core",
    "image_only": "core",
    "prediction_adata": "output",
    "spatial_library": "output",
    "write_h5ad": "output",
    "save_model": "card",
    "load_model": "card",
    "model_card": "card",
    "read_card": "card",
    "ModelCardError": "card",
    "ModelVersionError": "card",
    "ModelTamperedError": "card",
    "plot_maps": "maps",
    "check_map_genes": "maps",
    "predict_file": "files",
    "export_table": "files",
    "read_input": "files",
}

__all__ = [
    "ModelCardError",
    "ModelTamperedError",
    "ModelVersionError",
    "check_map_genes",
    "export_table",
    "image_only",
    "load_model",
    "model_card",
    "plot_maps",
    "predict",
    "predict_file",
    "prediction_adata",
    "read_card",
    "read_input",
    "save_model",
    "spatial_library",
    "write_h5ad",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
