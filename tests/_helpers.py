"""Helpers shared by the method tests."""

from __future__ import annotations

import numpy as np


def mean_pcc(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-gene Pearson r over spots, NaN genes (constant) left out."""
    from he2st.evaluate.metrics import pearson_per_gene

    return float(np.nanmean(pearson_per_gene(observed, predicted)[0]))
