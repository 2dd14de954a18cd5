"""Spatial-domain clustering of predicted expression, scored against annotations.

mclSTExp (supplementary notes, "spatial region detection") reduces the
predicted expression of a slide with PCA, clusters it with k-means and scores
the clusters against the pathologist's regions with the adjusted Rand index
(ARI) and normalised mutual information (NMI). :func:`cluster_agreement` does
that; without annotations it scores against k-means clusters of the observed
expression instead ("Observed Exp" in mclSTExp's Figure S3 is the same
clustering applied to the measured values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from he2st.errors import He2stInputError

#: Principal components kept before k-means (mclSTExp does not state its value).
N_PCS = 10
#: Clusters used when there are no labels to take the count from.
N_CLUSTERS = 5


def cluster_expression(values: np.ndarray, n_clusters: int, n_pcs: int = N_PCS, seed: int = 0) -> np.ndarray:
    """k-means labels of spots on the first ``n_pcs`` principal components of ``values``.

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` expression (normalised scale).
    n_clusters
        Number of clusters.
    n_pcs
        Components kept (capped at ``min(n_spots, n_genes)``).
    seed
        Random state of PCA and k-means (``n_init=10``).

    Returns
    -------
    numpy.ndarray
        ``(n_spots,)`` int64 cluster labels; all 0 when ``values`` is constant.

    Raises
    ------
    He2stInputError
        ``values`` is not a finite 2-D array, or ``n_clusters`` is not in ``[2, n_spots]``.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise He2stInputError(f"cluster_expression needs a finite 2-d array, got shape {x.shape}")
    if n_clusters < 2 or n_clusters > x.shape[0]:
        raise He2stInputError(f"n_clusters must be in [2, n_spots={x.shape[0]}], got {n_clusters}")
    k = int(min(n_pcs, x.shape[0], x.shape[1]))
    if x.std(axis=0).max() == 0:
        # A constant prediction (e.g. the mean baseline) has no structure: one cluster.
        return np.zeros(x.shape[0], dtype=np.int64)
    z = PCA(n_components=k, random_state=seed).fit_transform(x) if k < x.shape[1] else x - x.mean(axis=0)
    from threadpoolctl import threadpool_limits

    # Slides have hundreds to a few thousand spots: OpenMP start-up costs more
    # than it saves there (same labels either way).
    with threadpool_limits(limits=1 if x.shape[0] < 10000 else None):
        return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(z).astype(np.int64)


def cluster_agreement(
    observed: np.ndarray,
    predicted: np.ndarray,
    labels: Sequence[Any] | None = None,
    n_clusters: int | None = None,
    n_pcs: int = N_PCS,
    seed: int = 0,
    observed_reference: bool = True,
) -> dict[str, Any]:
    """ARI and NMI between k-means clusters of the predictions and a reference partition.

    Parameters
    ----------
    observed
        ``(n_spots, n_genes)`` measured expression; clustered to make the
        reference when ``labels`` is None.
    predicted
        ``(n_spots, n_genes)`` predicted expression.
    labels
        Optional per-spot annotation (e.g. ``slide.obs["label"]``); spots with a
        missing label (None/NaN) are left out of the scores.
    n_clusters
        Clusters for k-means; default: the number of distinct labels, else 5.
    n_pcs, seed
        See :func:`cluster_expression`.
    observed_reference
        With labels, also score the observed expression's own clusters (``ari_observed``).

    Returns
    -------
    dict
        ``ari``, ``nmi``, ``n_clusters``, ``reference`` (``"labels"`` or
        ``"observed_clusters"``), ``n_spots`` scored, and the ARI/NMI of the
        observed expression's own clusters against the labels (``ari_observed``,
        ``nmi_observed``; a reference point) when labels are given and ``observed_reference``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    obs = np.asarray(observed, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    if obs.shape != pred.shape:
        raise He2stInputError(f"observed {obs.shape} and predicted {pred.shape} differ in shape")
    out: dict[str, Any] = {}
    if labels is not None:
        lab = np.asarray([None if _missing(v) else str(v) for v in labels], dtype=object)
        if len(lab) != obs.shape[0]:
            raise He2stInputError(f"{len(lab)} labels for {obs.shape[0]} spots")
        keep = np.array([v is not None for v in lab])
        ref = lab[keep].astype(str)
        n = n_clusters or len(np.unique(ref))
        if n < 2:
            raise He2stInputError("labels hold fewer than 2 distinct classes: nothing to cluster against")
        out["reference"] = "labels"
        if observed_reference:
            obs_clusters = cluster_expression(obs[keep], n, n_pcs, seed)
            out["ari_observed"] = float(adjusted_rand_score(ref, obs_clusters))
            out["nmi_observed"] = float(normalized_mutual_info_score(ref, obs_clusters))
        pred_clusters = cluster_expression(pred[keep], n, n_pcs, seed)
    else:
        n = n_clusters or N_CLUSTERS
        keep = np.ones(obs.shape[0], dtype=bool)
        ref = cluster_expression(obs, n, n_pcs, seed)
        out["reference"] = "observed_clusters"
        pred_clusters = cluster_expression(pred, n, n_pcs, seed)
    out.update(
        ari=float(adjusted_rand_score(ref, pred_clusters)),
        nmi=float(normalized_mutual_info_score(ref, pred_clusters)),
        n_clusters=int(n),
        n_spots=int(keep.sum()),
    )
    return out


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(np.isnan(v))
    except TypeError:
        return str(v) in ("", "nan", "None")
