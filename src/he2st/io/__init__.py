"""Readers: spatial transcriptomics files -> slides (see :mod:`he2st.data.slide`).

Every reader returns a slide built by :func:`he2st.data.make_slide` and records in
``uns["he2st"]["source"]`` the files it read and how many spots it dropped and why.

=====================  =================================================================
``read_st_legacy``     ST v1 counts + spot file (+ labels), her2st layout
``read_visium``        Space Ranger ``outs/`` (h5 or mtx matrix, any positions file)
``read_hest``          a HEST-1k sample (``st/``, ``wsis/``, ``metadata/``)
``read_h5ad``          any AnnData with ``obsm["spatial"]`` (scanpy, squidpy, he2st)
``read_image``         an H&E image alone: an image-only slide (spots from a table or a grid)
=====================  =================================================================

:func:`he2st.datasets.read_any` picks the reader from what a path is.
"""

from __future__ import annotations

from he2st.io._common import MissingFileError
from he2st.io.h5ad import read_h5ad
from he2st.io.hest import read_hest
from he2st.io.image_only import read_image
from he2st.io.st_legacy import read_st_legacy
from he2st.io.visium import read_10x_h5, read_10x_mtx, read_visium

__all__ = [
    "MissingFileError",
    "read_10x_h5",
    "read_10x_mtx",
    "read_h5ad",
    "read_hest",
    "read_image",
    "read_st_legacy",
    "read_visium",
]
