"""Depth- and batch-aware reference banks: correct expression-only reference slides toward the training slides.

Reference slides sequenced at another depth (the 29 count-only her2st sections
are 2-9x shallower than C2-C6) put values on the bank whose per-gene
distribution differs from the training slides' even after CPM + log1p: fewer
non-zero spots, each non-zero count a larger jump. Two corrections, both fitted
on the training slides' bank rows and never on a query slide:

- :func:`match_moments`: each reference slide's values, gene by gene, are
  shifted and scaled to the training spots' mean and standard deviation
  (moment matching, the location/scale step of ComBat without its empirical
  Bayes shrinkage), then clipped to the training range.
- :func:`harmonize_to_training`: Harmony (Korsunsky et al., Nature Methods
  2019; the ``harmonypy`` package) on the bank's expression embeddings with
  the slide as batch; its corrections are re-expressed in the training rows'
  frame (each row's correction minus the soft-cluster mean correction of the
  training rows), so training keys stay where the image encoder learnt to
  find them and only the reference rows move.
"""

from __future__ import annotations

import numpy as np

from he2st.errors import He2stInputError

__all__ = ["CORRECTIONS", "harmonize_to_training", "match_moments", "moments"]

#: Accepted values of the ``reference_correction`` option.
CORRECTIONS = (None, "scale", "harmony", "scale+harmony")


def moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene mean, standard deviation and minimum of ``(n_spots, n_genes)`` values.

    Parameters
    ----------
    values
        Expression on the bank's scale.

    Returns
    -------
    mean, sd, minimum
        ``(n_genes,)`` float64 each.
    """
    v = np.asarray(values, dtype=np.float64)
    return v.mean(axis=0), v.std(axis=0), v.min(axis=0)


def match_moments(values: np.ndarray, target_mean: np.ndarray, target_sd: np.ndarray,
                  target_min: np.ndarray | None = None) -> np.ndarray:
    """One slide's values moved, gene by gene, to the target mean and sd.

    ``(v - mean_slide) / sd_slide * sd_target + mean_target``; a gene constant on
    the slide (sd 0) takes the target mean. Values are clipped below at
    ``target_min`` (e.g. 0 for log-normalised counts).

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` values of ONE slide.
    target_mean, target_sd
        ``(n_genes,)`` moments of the training spots.
    target_min
        ``(n_genes,)`` lower bounds, or None.

    Returns
    -------
    numpy.ndarray
        float32 corrected values.
    """
    v = np.asarray(values, dtype=np.float64)
    mean, sd, _ = moments(v)
    z = np.divide(v - mean, sd, out=np.zeros_like(v), where=sd > 0)
    out = z * np.asarray(target_sd)[None, :] + np.asarray(target_mean)[None, :]
    if target_min is not None:
        out = np.maximum(out, np.asarray(target_min)[None, :])
    return out.astype(np.float32)


def harmonize_to_training(embeddings: np.ndarray, batches: np.ndarray, training: np.ndarray, *, seed: int = 0,
                          theta: float = 2.0) -> np.ndarray:
    """Harmony-corrected embeddings in the frame of the training rows (which keep their values).

    Parameters
    ----------
    embeddings
        ``(n, d)`` bank keys (expression embeddings).
    batches
        ``(n,)`` batch label of each row (the slide id).
    training
        ``(n,)`` bool, the training (and validation) rows; at least one row must be one.
    seed
        Harmony's ``random_state``.
    theta
        Harmony's diversity penalty (its default, 2).

    Returns
    -------
    numpy.ndarray
        float32 ``(n, d)``: training rows unchanged, others corrected.

    Raises
    ------
    He2stInputError
        No training row, or fewer than two batches.
    """
    import harmonypy

    Z = np.asarray(embeddings, dtype=np.float64)
    training = np.asarray(training, dtype=bool)
    labels = np.asarray([str(b) for b in batches])
    if not training.any():
        raise He2stInputError("harmony correction of a reference bank needs training rows")
    if len(np.unique(labels)) < 2 or training.all():
        return Z.astype(np.float32)
    ho = harmonypy.run_harmony(Z, {"batch": labels}, "batch", theta=theta, random_state=seed, verbose=False, ncores=1)
    corrected = np.asarray(ho.Z_corr, dtype=np.float64)
    if corrected.shape != Z.shape:
        corrected = corrected.T
    R = np.asarray(ho.R, dtype=np.float64)
    if R.shape[0] != len(Z):
        R = R.T
    delta = corrected - Z
    # The training rows' mean correction in each soft cluster, taken back from every row.
    w = R[training]
    cluster_shift = (w.T @ delta[training]) / np.maximum(w.sum(axis=0), 1e-12)[:, None]
    out = corrected - R @ cluster_shift
    out[training] = Z[training]
    return out.astype(np.float32)
