"""The data model: a slide is an AnnData (:mod:`he2st.data.slide`), a cohort an ordered list of slides."""

from he2st.data.cohort import Cohort
from he2st.data.slide import SlideMeta, make_slide, meta, require_counts, slide_id, validate_slide

__all__ = ["Cohort", "SlideMeta", "make_slide", "meta", "require_counts", "slide_id", "validate_slide"]
