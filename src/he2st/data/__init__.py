"""Slides, cohorts, gene panels, normalisation and splits."""

from he2st.data.cohort import Cohort
from he2st.data.slide import SlideMeta, make_slide, meta, require_counts, slide_id, validate_slide
from he2st.data.genes import GenePanel, select_genes
from he2st.data.normalize import Normalizer, normalize

__all__ = ["GenePanel", "Normalizer", "normalize", "select_genes", "Cohort", "SlideMeta", "make_slide", "meta", "require_counts", "slide_id", "validate_slide"]
