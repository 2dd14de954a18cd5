"""The seed papers' downstream analyses of predicted expression, as plain functions on AnnData.

Each compares predicted with observed expression of one slide (a prediction file
of a run holds both: ``X`` predicted, ``layers["observed"]`` measured, same scale):

- :func:`gene_gene_correlation`: gene-gene Pearson matrices of the top HEG or
  HVG, observed and predicted, in the order of a hierarchical clustering of the
  observed matrix, and the correlation of their upper triangles (mclSTExp Fig. 5,
  CMRCNet Fig. 4).
- :func:`region_detection`: PCA + k-means (the papers) or Leiden (scanpy, as
  users do) on predicted expression, ARI/NMI against region labels, or against
  the same clustering of observed expression (mclSTExp, CMRCNet, SpaHGC).
- :func:`differential_expression` (``scanpy.tl.rank_genes_groups``),
  :func:`read_gmt` and :func:`enrichment` (over-representation: one-sided
  Fisher exact test = hypergeometric upper tail, scipy) (SpaHGC Fig. S11).

:func:`analyze_run` runs them over the saved predictions of a run folder and
writes ``<run>/analyses/`` (``he2st analyze RUN_DIR``); the report
(:mod:`he2st.analysis.report`) draws them when that folder exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st._utils import atomic_path, atomic_write_json
from he2st.errors import He2stInputError

#: Sub-folder of a run folder that :func:`analyze_run` writes.
ANALYSES_DIR = "analyses"
#: Clustering algorithms of :func:`region_detection`.
CLUSTER_METHODS = ("kmeans", "leiden")


def _matrix(adata: Any, layer: str | None = None) -> np.ndarray:
    x = adata.layers[layer] if layer is not None else adata.X
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64)


def _observed_predicted(observed: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Observed and predicted matrices on the genes the two share (predicted order)."""
    pred = _matrix(predicted)
    genes = [str(g) for g in predicted.var_names]
    if observed is None:
        if "observed" not in predicted.layers:
            raise He2stInputError("the prediction holds no layers['observed']; pass the observed AnnData")
        return _matrix(predicted, "observed"), pred, genes
    if observed.n_obs != predicted.n_obs or list(observed.obs_names) != list(predicted.obs_names):
        raise He2stInputError("observed and predicted AnnData must have the same spots (obs_names) in the same order")
    obs_genes = [str(g) for g in observed.var_names]
    shared = [g for g in genes if g in set(obs_genes)]
    if not shared:
        raise He2stInputError("observed and predicted share no gene")
    oi = [obs_genes.index(g) for g in shared]
    pi = [genes.index(g) for g in shared]
    return _matrix(observed)[:, oi], pred[:, pi], shared


# -- gene-gene correlation ---------------------------------------------------------------------


@dataclass
class GeneGeneCorrelation:
    """Gene-gene correlation matrices of one slide.

    Parameters
    ----------
    genes
        The genes, in the order of the hierarchical clustering of ``observed``.
    observed, predicted
        ``(n, n)`` Pearson matrices (DataFrames indexed by ``genes``); NaN for a constant gene.
    r
        Pearson correlation between the upper triangles of the two matrices (NaN if undefined).
    kind
        ``"HEG"``, ``"HVG"`` or ``"genes"`` (a given list).
    """

    genes: list[str]
    observed: pd.DataFrame
    predicted: pd.DataFrame
    r: float
    kind: str


def _corr(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(x, rowvar=False)
    return np.atleast_2d(c)


def gene_gene_correlation(
    observed: Any,
    predicted: Any,
    genes: Sequence[str] | None = None,
    n_top: int = 50,
    kind: str = "HEG",
) -> GeneGeneCorrelation:
    """Gene-gene correlation of observed and predicted expression, in the observed clustering order.

    Parameters
    ----------
    observed
        Observed AnnData of the slide, or None to use ``predicted.layers["observed"]``.
    predicted
        Predicted AnnData (same spots).
    genes
        Genes to use; default the ``n_top`` genes of ``kind`` in the observed values.
    n_top
        Size of the gene set when ``genes`` is None.
    kind
        ``"HEG"`` (highest mean observed expression) or ``"HVG"`` (highest observed variance).

    Returns
    -------
    GeneGeneCorrelation
        Both matrices ordered by average-linkage clustering of the observed one
        (distance ``1 - r``), and the correlation of their upper triangles.

    Raises
    ------
    He2stInputError
        Unknown ``kind``, unknown genes, or fewer than 3 genes.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    from he2st.evaluate.metrics import top_genes_by

    obs, pred, panel = _observed_predicted(observed, predicted)
    if genes is None:
        if kind not in ("HEG", "HVG"):
            raise He2stInputError(f"kind must be 'HEG' or 'HVG', got {kind!r}")
        score = obs.mean(axis=0) if kind == "HEG" else obs.var(axis=0)
        chosen = top_genes_by(score, panel, n_top)
    else:
        missing = [g for g in genes if g not in panel]
        if missing:
            raise He2stInputError(f"genes not in the prediction: {missing[:5]}")
        chosen, kind = [str(g) for g in genes], "genes"
    if len(chosen) < 3:
        raise He2stInputError(f"gene-gene correlation needs at least 3 genes, got {len(chosen)}")
    idx = [panel.index(g) for g in chosen]
    co, cp = _corr(obs[:, idx]), _corr(pred[:, idx])
    dist = 1.0 - np.nan_to_num(co, nan=0.0)
    dist = np.clip((dist + dist.T) / 2, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    order = leaves_list(linkage(squareform(dist, checks=False), method="average"))
    names = [chosen[i] for i in order]
    co, cp = co[np.ix_(order, order)], cp[np.ix_(order, order)]
    iu = np.triu_indices(len(names), k=1)
    a, b = co[iu], cp[iu]
    ok = np.isfinite(a) & np.isfinite(b)
    r = float("nan")
    if ok.sum() >= 2 and a[ok].std() > 0 and b[ok].std() > 0:
        r = float(np.corrcoef(a[ok], b[ok])[0, 1])
    return GeneGeneCorrelation(
        names, pd.DataFrame(co, index=names, columns=names), pd.DataFrame(cp, index=names, columns=names), r, kind
    )


# -- region detection --------------------------------------------------------------------------


def cluster_spots(values: np.ndarray, method: str = "kmeans", n_clusters: int = 5, seed: int = 0, resolution: float = 1.0) -> np.ndarray:
    """Cluster spots on their expression: PCA + k-means, or PCA + kNN graph + Leiden (scanpy).

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` expression (normalised scale).
    method
        ``"kmeans"`` (:func:`he2st.evaluate.clustering.cluster_expression`) or ``"leiden"``.
    n_clusters
        Clusters of k-means (Leiden picks its own number from ``resolution``).
    seed
        Random state.
    resolution
        Leiden resolution.

    Returns
    -------
    numpy.ndarray
        ``(n_spots,)`` int64 labels; all 0 for a constant input.

    Raises
    ------
    He2stInputError
        Unknown ``method``.
    """
    from he2st.evaluate.clustering import N_PCS, cluster_expression

    x = np.asarray(values, dtype=np.float64)
    if method == "kmeans":
        return cluster_expression(x, n_clusters, seed=seed)
    if method != "leiden":
        raise He2stInputError(f"clustering method must be one of {CLUSTER_METHODS}, got {method!r}")
    if x.std(axis=0).max() == 0:
        return np.zeros(x.shape[0], dtype=np.int64)
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(x.astype(np.float32))
    k = int(min(N_PCS, x.shape[0] - 1, x.shape[1] - 1))
    if k >= 2:
        sc.pp.pca(a, n_comps=k, random_state=seed)
        sc.pp.neighbors(a, n_neighbors=min(15, x.shape[0] - 1), use_rep="X_pca", random_state=seed)
    else:
        sc.pp.neighbors(a, n_neighbors=min(15, x.shape[0] - 1), use_rep="X", random_state=seed)
    sc.tl.leiden(a, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return a.obs["leiden"].astype(int).to_numpy(dtype=np.int64)


def region_detection(
    adata_pred: Any,
    adata_obs: Any = None,
    labels: str | Sequence[Any] | None = "label",
    method: str = "kmeans",
    n_clusters: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Spatial regions from predicted expression, scored by ARI and NMI.

    Parameters
    ----------
    adata_pred
        Predicted AnnData of a slide.
    adata_obs
        Observed AnnData (same spots), or None to use ``adata_pred.layers["observed"]``.
    labels
        Region labels: an ``obs`` column name (of ``adata_pred``, else ``adata_obs``),
        per-spot values, or None. When missing, the reference is the same
        clustering of the observed expression.
    method
        ``"kmeans"`` (PCA + k-means, as the papers) or ``"leiden"`` (scanpy).
    n_clusters
        k-means clusters; default the number of distinct labels, else 5.
    seed
        Random state.

    Returns
    -------
    dict
        ``predicted`` (cluster per spot), ``observed`` (the same clustering of the
        observed expression), ``reference`` (the partition scored against),
        ``reference_kind`` (``"labels"`` or ``"observed_clusters"``), ``ari``,
        ``nmi``, ``ari_observed``/``nmi_observed`` (observed clusters vs labels; NaN
        without labels), ``n_clusters``, ``n_spots`` scored.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from he2st.evaluate.clustering import N_CLUSTERS, _missing

    obs, pred, _ = _observed_predicted(adata_obs, adata_pred)
    lab = None
    if isinstance(labels, str):
        for a in (adata_pred, adata_obs):
            if a is not None and labels in a.obs:
                lab = list(a.obs[labels])
                break
    elif labels is not None:
        lab = list(labels)
    if lab is not None:
        if len(lab) != pred.shape[0]:
            raise He2stInputError(f"{len(lab)} labels for {pred.shape[0]} spots")
        keep = np.array([not _missing(v) for v in lab])
        ref = np.asarray([str(v) for v in lab], dtype=object)
        if len(set(ref[keep])) < 2:
            lab = None
    n = n_clusters or (len(set(ref[keep])) if lab is not None else N_CLUSTERS)
    n = int(max(2, min(n, pred.shape[0])))
    pc = cluster_spots(pred, method, n, seed)
    oc = cluster_spots(obs, method, n, seed)
    out: dict[str, Any] = {"predicted": pc, "observed": oc, "n_clusters": n}
    if lab is not None:
        r = ref[keep].astype(str)
        out.update(
            reference=ref, reference_kind="labels",
            ari=float(adjusted_rand_score(r, pc[keep])), nmi=float(normalized_mutual_info_score(r, pc[keep])),
            ari_observed=float(adjusted_rand_score(r, oc[keep])), nmi_observed=float(normalized_mutual_info_score(r, oc[keep])),
            n_spots=int(keep.sum()),
        )
    else:
        out.update(
            reference=oc, reference_kind="observed_clusters",
            ari=float(adjusted_rand_score(oc, pc)), nmi=float(normalized_mutual_info_score(oc, pc)),
            ari_observed=float("nan"), nmi_observed=float("nan"), n_spots=int(pred.shape[0]),
        )
    return out


# -- differential expression and enrichment ----------------------------------------------------


def differential_expression(
    adata: Any,
    groupby: str,
    group: str,
    reference: str = "rest",
    n_top: int = 50,
    layer: str | None = None,
    method: str = "wilcoxon",
) -> pd.DataFrame:
    """Genes up in one group of spots against the rest (``scanpy.tl.rank_genes_groups``).

    Parameters
    ----------
    adata
        Expression (log-normalised scale), with ``obs[groupby]``.
    groupby
        ``obs`` column of the groups (e.g. ``"label"``).
    group
        The group tested (e.g. ``"invasive cancer"``).
    reference
        ``"rest"`` or another group.
    n_top
        Genes returned (the highest scores).
    layer
        Layer to test (None: ``X``; ``"observed"`` for the measured values of a prediction file).
    method
        scanpy's test (``"wilcoxon"``, ``"t-test"``, ...).

    Returns
    -------
    pandas.DataFrame
        ``rank, gene, score, logfoldchange, pvalue, padj``, best first.

    Raises
    ------
    He2stInputError
        ``groupby`` missing, or ``group``/``reference`` without spots.
    """
    import anndata as ad
    import scanpy as sc

    if groupby not in adata.obs:
        raise He2stInputError(f"no obs[{groupby!r}] to group spots by")
    groups = adata.obs[groupby].astype(str)
    for g in [group] + ([] if reference == "rest" else [reference]):
        if not (groups == g).any():
            raise He2stInputError(f"no spot has {groupby} == {g!r}; groups: {sorted(set(groups))}")
    if reference == "rest" and (groups == group).all():
        raise He2stInputError(f"every spot has {groupby} == {group!r}: nothing to compare with")
    a = ad.AnnData(_matrix(adata, layer).astype(np.float32), obs=pd.DataFrame({"g": pd.Categorical(groups)}, index=adata.obs_names))
    a.var_names = [str(v) for v in adata.var_names]
    sc.tl.rank_genes_groups(a, "g", groups=[group], reference=reference, method=method, n_genes=a.n_vars)
    df = sc.get.rank_genes_groups_df(a, group=group)
    df = df.rename(columns={"names": "gene", "scores": "score", "logfoldchanges": "logfoldchange", "pvals": "pvalue", "pvals_adj": "padj"})
    df = df.head(n_top).reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df[["rank", "gene", "score", "logfoldchange", "pvalue", "padj"]]


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets of a GMT file (one set a line: name, description, genes, tab-separated).

    Parameters
    ----------
    path
        The GMT file (e.g. MSigDB's).

    Returns
    -------
    dict
        ``{set name: [genes]}`` in file order.

    Raises
    ------
    He2stInputError
        Missing file, or a line with fewer than 3 fields.
    """
    p = Path(path)
    if not p.is_file():
        raise He2stInputError(f"{str(p)!r}: no such GMT file")
    sets: dict[str, list[str]] = {}
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) < 3:
            raise He2stInputError(f"{str(p)!r} line {i}: a GMT line needs a name, a description and genes (tab-separated)")
        sets[parts[0]] = list(dict.fromkeys(g.strip() for g in parts[2:] if g.strip()))
    return sets


def enrichment(gene_list: Sequence[str], gene_sets: Mapping[str, Sequence[str]], universe: Sequence[str]) -> pd.DataFrame:
    """Over-representation of gene sets in a gene list (one-sided Fisher exact test, BH-adjusted).

    The test of each set is ``scipy.stats.fisher_exact(alternative="greater")`` on
    the 2x2 table list x set within ``universe``: the hypergeometric upper tail
    ``hypergeom.sf(k - 1, M, n, N)``. Genes outside the universe are ignored.

    Parameters
    ----------
    gene_list
        The genes tested (e.g. top DE genes).
    gene_sets
        ``{name: genes}`` (e.g. :func:`read_gmt`).
    universe
        All genes that could have been listed (the panel).

    Returns
    -------
    pandas.DataFrame
        ``gene_set, set_size`` (in the universe), ``list_size, overlap, odds_ratio,
        pvalue, padj, genes`` (the overlap, ``;``-joined), by p-value; sets with no
        gene in the universe are left out.
    """
    from scipy.stats import false_discovery_control, fisher_exact

    uni = list(dict.fromkeys(str(g) for g in universe))
    u = set(uni)
    lst = {str(g) for g in gene_list} & u
    m, nl = len(u), len(lst)
    rows = []
    for name, genes in gene_sets.items():
        s = {str(g) for g in genes} & u
        if not s:
            continue
        k = len(s & lst)
        table = [[k, nl - k], [len(s) - k, m - nl - len(s) + k]]
        odds, p = fisher_exact(table, alternative="greater")
        rows.append({"gene_set": name, "set_size": len(s), "list_size": nl, "overlap": k, "odds_ratio": float(odds),
                     "pvalue": float(p), "genes": ";".join(g for g in uni if g in s and g in lst)})
    cols = ["gene_set", "set_size", "list_size", "overlap", "odds_ratio", "pvalue", "padj", "genes"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    df["padj"] = false_discovery_control(df["pvalue"].to_numpy(), method="bh")
    return df.sort_values(["pvalue", "gene_set"], kind="stable").reset_index(drop=True)[cols]


# -- a run folder ------------------------------------------------------------------------------


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def analyze_run(
    out: str | os.PathLike,
    *,
    gmt: str | os.PathLike | None = None,
    groupby: str = "label",
    group: str | None = None,
    n_top: int = 50,
    clusters: Sequence[str] = CLUSTER_METHODS,
    seed: int = 0,
) -> dict[str, Path]:
    """Run the analyses over every saved prediction of a run and write ``<out>/analyses/``.

    Written atomically (CSV unless said): ``metrics.csv`` (long, as the run's
    ``metrics.csv``: ``gene_gene_r`` per HEG/HVG, ``region_ari``/``region_nmi``
    per clustering), ``gene_gene.csv``, ``regions.csv``, ``clusters.csv`` (cluster
    of every spot, ``method == "observed"`` for the observed expression), and,
    when spots carry ``obs[groupby]``, ``de.csv``, ``de_overlap.csv`` and, with
    ``gmt``, ``enrichment.csv``; ``params.json`` records the options.

    Parameters
    ----------
    out
        The run folder.
    gmt
        Gene sets (GMT) for over-representation of the DE lists.
    groupby
        ``obs`` column of region labels (ARI/NMI and DE).
    group
        The group tested in DE (default: the most frequent label of the run).
    n_top
        Genes per HEG/HVG set, and per DE list up to a fifth of the panel (at least 5), so
        that a small panel's list is not the whole panel. Constant predictions (the mean
        baseline) get no DE list (``params.json``: ``de_skipped_constant``).
    clusters
        Clusterings: ``kmeans`` and/or ``leiden``.
    seed
        Random state of the clusterings.

    Returns
    -------
    dict
        ``{table name: path}`` of the files written.

    Raises
    ------
    He2stInputError
        Not a run folder, no prediction files, an unknown clustering, or a bad GMT file.
    """
    import anndata as ad

    from he2st.evaluate.results import read_run

    run = read_run(out)
    bad = [c for c in clusters if c not in CLUSTER_METHODS]
    if bad or not clusters:
        raise He2stInputError(f"--clusters: choose from {CLUSTER_METHODS}, got {list(clusters)}")
    gene_sets = read_gmt(gmt) if gmt is not None else None
    files = [(m, fold, slide, p) for m in run.methods for (fold, slide), p in sorted(run.prediction_files(m).items())]
    if not files:
        raise He2stInputError(f"{str(out)!r}: the run holds no prediction files to analyse")
    preds = {(m, fold, slide): ad.read_h5ad(p) for m, fold, slide, p in files}
    if group is None:
        counts = pd.concat([a.obs[groupby].astype(str) for a in preds.values() if groupby in a.obs] or [pd.Series([], dtype=str)])
        group = str(counts.value_counts().index[0]) if len(counts) else None

    metric_rows, gg_rows, reg_rows, clus_rows, de_rows, ov_rows, en_rows = [], [], [], [], [], [], []
    observed_done: set[tuple[str, str]] = set()
    obs_de: dict[str, pd.DataFrame] = {}
    skipped_constant: set[str] = set()
    for (m, fold, slide), a in preds.items():
        keys = {"method": m, "fold": fold, "test_slide": slide}
        for kind in ("HEG", "HVG"):
            gg = gene_gene_correlation(None, a, n_top=n_top, kind=kind)
            gg_rows.append({**keys, "kind": kind, "n_genes": len(gg.genes), "r": gg.r})
            metric_rows.append({**keys, "metric": "gene_gene_r", "gene_set": kind, "value": gg.r, "n_genes": len(gg.genes),
                                "n_nan": int(np.isnan(gg.r))})
        for algo in clusters:
            rd = region_detection(a, labels=groupby, method=algo, seed=seed)
            reg_rows.append({**keys, "clustering": algo, "reference": rd["reference_kind"], "ari": rd["ari"], "nmi": rd["nmi"],
                             "ari_observed": rd["ari_observed"], "nmi_observed": rd["nmi_observed"], "n_clusters": rd["n_clusters"],
                             "n_spots": rd["n_spots"]})
            for metric in ("ari", "nmi"):
                metric_rows.append({**keys, "metric": f"region_{metric}", "gene_set": algo, "value": rd[metric],
                                    "n_genes": a.n_vars, "n_nan": int(np.isnan(rd[metric]))})
            spots = [str(s) for s in a.obs_names]
            clus_rows.append(pd.DataFrame({"method": m, "test_slide": slide, "clustering": algo, "spot": spots, "cluster": rd["predicted"]}))
            if (slide, algo) not in observed_done:
                observed_done.add((slide, algo))
                clus_rows.append(pd.DataFrame({"method": "observed", "test_slide": slide, "clustering": algo, "spot": spots,
                                               "cluster": rd["observed"]}))
        if group is None or groupby not in a.obs or not (a.obs[groupby].astype(str) == group).any() \
                or (a.obs[groupby].astype(str) == group).all():
            continue
        if _constant_prediction(a):
            # A constant map (the mean baseline) ranks genes by ties alone: no DE list to compare.
            skipped_constant.add(m)
            continue
        # Top lists of at most a fifth of the panel: on a small panel a list of n_top genes would be
        # the whole panel, and every overlap and enrichment would be trivially complete.
        n_de = min(n_top, max(5, a.n_vars // 5))
        if slide not in obs_de:
            obs_de[slide] = differential_expression(a, groupby, group, n_top=n_de, layer="observed")
            de_rows.append(obs_de[slide].assign(method="observed", test_slide=slide))
        de = differential_expression(a, groupby, group, n_top=n_de)
        de_rows.append(de.assign(method=m, test_slide=slide))
        top_o, top_p = list(obs_de[slide]["gene"]), list(de["gene"])
        both = [g for g in top_p if g in set(top_o)]
        ov_rows.append({**keys, "group": group, "n_top": n_de, "n_observed": len(top_o), "n_predicted": len(top_p),
                        "overlap": len(both), "jaccard": len(both) / max(1, len(set(top_o) | set(top_p))), "genes": ";".join(both)})
        if gene_sets is not None:
            universe = [str(g) for g in a.var_names]
            if not any(r["method"] == "observed" and r["test_slide"] == slide for r in en_rows):
                en_rows += enrichment(top_o, gene_sets, universe).assign(method="observed", test_slide=slide).to_dict("records")
            en_rows += enrichment(top_p, gene_sets, universe).assign(method=m, test_slide=slide).to_dict("records")

    root = Path(out) / ANALYSES_DIR
    written: dict[str, Path] = {}
    from he2st.evaluate.results import METRICS_COLUMNS

    tables = {
        "metrics": pd.DataFrame(metric_rows, columns=METRICS_COLUMNS),
        "gene_gene": pd.DataFrame(gg_rows),
        "regions": pd.DataFrame(reg_rows),
        "clusters": pd.concat(clus_rows, ignore_index=True),
    }
    if de_rows:
        de_all = pd.concat(de_rows, ignore_index=True)
        tables["de"] = de_all[["method", "test_slide"] + [c for c in de_all.columns if c not in ("method", "test_slide")]]
        tables["de_overlap"] = pd.DataFrame(ov_rows)
    if en_rows:
        en = pd.DataFrame(en_rows)
        tables["enrichment"] = en[["method", "test_slide"] + [c for c in en.columns if c not in ("method", "test_slide")]]
    for name in ("de", "de_overlap", "enrichment"):  # a table of an earlier call that this one did not make
        if name not in tables and (root / f"{name}.csv").exists():
            (root / f"{name}.csv").unlink()
    for name, df in tables.items():
        written[name] = root / f"{name}.csv"
        _write_csv(df, written[name])
    params = {"n_top": n_top, "groupby": groupby, "group": group, "clusters": list(clusters), "seed": seed,
              "gmt": str(gmt) if gmt is not None else None, "de_skipped_constant": sorted(skipped_constant)}
    atomic_write_json(root / "params.json", params)
    written["params"] = root / "params.json"
    return written


def _constant_prediction(a: Any) -> bool:
    """Whether every predicted gene is constant over the slide's spots (e.g. the mean baseline)."""
    x = np.asarray(a.X, dtype=np.float64)
    return bool(len(x) == 0 or np.all(np.ptp(x, axis=0) == 0))


def read_analyses(out: str | os.PathLike) -> dict[str, Any]:
    """The tables :func:`analyze_run` wrote (empty dict when the run has none).

    Parameters
    ----------
    out
        The run folder.

    Returns
    -------
    dict
        ``{table name: DataFrame}`` plus ``"params"`` (dict).
    """
    root = Path(out) / ANALYSES_DIR
    if not (root / "params.json").is_file():
        return {}
    res: dict[str, Any] = {"params": json.loads((root / "params.json").read_text())}
    for p in sorted(root.glob("*.csv")):
        if not p.name.startswith("."):
            res[p.stem] = pd.read_csv(p)
    return res
