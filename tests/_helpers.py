"""Helpers shared by the method tests."""

from __future__ import annotations

import numpy as np


def mean_pcc(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Mean per-gene Pearson r over spots, NaN genes (constant) left out."""
    from he2st.evaluate.metrics import pearson_per_gene

    return float(np.nanmean(pearson_per_gene(observed, predicted)[0]))


def with_leak_gene(base, leaky_slide: str = "syn2", seed: int = 0):
    """A copy of a cohort with a gene ``LEAK`` expressed (strongly, variably) in ``leaky_slide`` only.

    A model that saw the leaky slide's counts learns LEAK; one that did not cannot (its
    training counts of LEAK are all zero), which is what the leakage tests check.
    """
    import scipy.sparse as sp

    from he2st.data import Cohort, make_slide, meta

    rng = np.random.default_rng(seed)
    slides = []
    for s in base:
        m = meta(s)
        leak = rng.poisson(50, size=s.n_obs) * rng.integers(0, 2, size=s.n_obs) if m.slide_id == leaky_slide else np.zeros(s.n_obs)
        X = sp.hstack([s.X, sp.csr_matrix(leak.reshape(-1, 1).astype(np.float32))]).tocsr()
        slides.append(
            make_slide(
                X, s.obs_names, [*map(str, s.var_names), "LEAK"], s.obsm["spatial"], slide_id=m.slide_id,
                patient=m.patient, image_path=m.image_path, spot_diameter_px=m.spot_diameter_px, mpp=m.mpp,
                array_row=s.obs["array_row"], array_col=s.obs["array_col"], labels=s.obs["label"],
            )
        )
    return Cohort(slides, name="leaky")


def image_only(slide):
    """The slide as a never-sequenced section: same image, spots and scale; no genes, counts=False."""
    from he2st.data.slide import make_slide, meta

    m = meta(slide)
    return make_slide(
        None, list(slide.obs_names), [], np.asarray(slide.obsm["spatial"]), slide_id=m.slide_id, patient=m.patient,
        image_path=m.image_path, spot_diameter_px=m.spot_diameter_px, mpp=m.mpp, scale=m.scale,
        array_row=slide.obs["array_row"].to_numpy(), array_col=slide.obs["array_col"].to_numpy(), counts=False,
    )
