"""Preprocessing of slides (AnnData), scanpy-style: gene panels and target normalisation.

::

    from he2st.pp import select_genes, Normalizer
    panel = select_genes(train_slides, n_top_hvg=1000)      # training slides only
    y = Normalizer("cpm_log1p").fit(train_slides, panel.genes).transform(test_slide, panel.genes)
"""

from he2st.pp.genes import GenePanel, common_genes, select_genes
from he2st.pp.normalize import Normalizer, normalize

__all__ = ["GenePanel", "Normalizer", "common_genes", "normalize", "select_genes"]
