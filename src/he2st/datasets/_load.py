"""Load a dataset by name or path.

``load``: a cohort by name (``synthetic``, ``her2st``) or from a path;
``read_any``: pick the reader from what a path is; ``summarize``: a text report
of a slide or cohort (``he2st info``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import He2stInputError, ImageError
from he2st.io._common import MissingFileError, PathLike


def load(data: str, params: Mapping[str, Any] | None = None) -> Any:
    """The cohort a name or path stands for.

    Parameters
    ----------
    data
        ``"synthetic"`` (:func:`he2st.datasets.synthetic`), ``"her2st"``
        (:func:`he2st.datasets.her2st`), or a dataset folder that
        :func:`read_any` reads as a cohort.
    params
        Keyword arguments of the named dataset's builder (e.g. ``{"n_slides": 3}``,
        ``{"sections": ["C2", "C3"]}``); not accepted with a path.

    Returns
    -------
    Cohort
        The slides.

    Raises
    ------
    He2stInputError
        ``params`` given with a path, or the path holds a single slide.
    """
    from he2st.data import Cohort

    params = dict(params or {})
    if data == "synthetic":
        from he2st.datasets import synthetic

        return synthetic(**params)
    if data == "her2st":
        from he2st.datasets import her2st

        return her2st(**params)
    if params:
        raise He2stInputError(f"data_params {sorted(params)} only apply to 'synthetic' and 'her2st', not to a path")
    obj = read_any(data)
    if not isinstance(obj, Cohort):
        raise He2stInputError(f"{data!r} holds a single slide; a benchmark needs a cohort of at least 2 slides")
    return obj


def read_any(path: PathLike) -> Any:
    """Read a slide or a cohort from whatever ``path`` is.

    Recognised, in this order:

    - a ``.h5ad`` file (a HEST sample when it sits in ``st/`` of a HEST folder) -> slide;
    - a Space Ranger ``outs`` folder (or the run folder holding ``outs``) -> slide;
    - a HEST-1k folder -> slide if it holds one sample, else a cohort;
    - a her2st root (``ST-cnts/`` + ``ST-spotfiles/``) -> cohort of every section;
    - a folder of ``.h5ad`` files -> cohort.

    Parameters
    ----------
    path
        File or folder to read.

    Returns
    -------
    anndata.AnnData or he2st.data.Cohort
        A slide, or a cohort of slides (named after the folder).

    Raises
    ------
    MissingFileError
        ``path`` does not exist.
    He2stInputError
        ``path`` is none of the above.
    """
    from he2st.io.h5ad import read_h5ad
    from he2st.io.hest import hest_sample_ids, is_hest_root, read_hest
    from he2st.io.visium import find_outs, read_visium

    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{str(p)!r} does not exist")
    if p.is_file():
        if p.suffix == ".h5ad":
            if p.parent.name == "st" and is_hest_root(p.parent.parent):
                return read_hest(p)
            return read_h5ad(p)
        raise He2stInputError(
            f"{str(p)!r}: cannot tell what this file is; expected a .h5ad file or a folder "
            "(Space Ranger outs, HEST-1k, her2st)"
        )
    if find_outs(p) is not None:
        return read_visium(p)
    from he2st.data import Cohort

    if is_hest_root(p):
        ids = hest_sample_ids(p)
        if len(ids) == 1:
            return read_hest(p, ids[0])
        return Cohort([read_hest(p, i) for i in ids], name=p.name)
    if (p / "ST-cnts").is_dir() and (p / "ST-spotfiles").is_dir():
        from he2st.datasets import her2st

        return her2st(root=p, with_images_only=False)
    h5ads = sorted(p.glob("*.h5ad"))
    if h5ads:
        return Cohort([read_h5ad(f) for f in h5ads], name=p.name)
    raise He2stInputError(
        f"{str(p)!r}: not a recognised dataset folder; expected a Space Ranger outs folder "
        "(filtered_feature_bc_matrix[.h5] + spatial/), a HEST-1k folder (st/, wsis/, metadata/), "
        "a her2st root (ST-cnts/, ST-spotfiles/) or a folder of .h5ad files"
    )


def summarize(obj: Any) -> str:
    """A human-readable multi-line summary of a slide or a cohort.

    Parameters
    ----------
    obj
        A slide (AnnData) or a :class:`~he2st.data.Cohort`.

    Returns
    -------
    str
        The summary printed by ``he2st info``: spots, genes, counts, labels,
        image and provenance per slide (and totals for a cohort).
    """
    from he2st.data import Cohort

    if isinstance(obj, Cohort):
        return _summarize_cohort(obj)
    return _summarize_slide(obj)


def _summarize_slide(adata: Any) -> str:
    from he2st.data import meta

    m = meta(adata)
    lines = [f"slide {m.slide_id!r} (patient {m.patient!r})"]
    X = adata.X
    nnz = X.nnz if hasattr(X, "nnz") else int(np.count_nonzero(X))
    density = nnz / max(1, adata.n_obs * adata.n_vars)
    totals = np.asarray(X.sum(axis=1)).ravel()
    if m.counts:
        kind = f"raw counts, median {np.median(totals):.0f} UMI per spot"
    else:
        kind = "pre-normalised values (not counts)"
    lines.append(f"  spots: {adata.n_obs}   genes: {adata.n_vars}   matrix: {kind}, {density:.1%} non-zero")
    lines.append(f"  image: {_image_text(m.image_path)}")
    mpp = "unknown" if m.mpp is None else f"{m.mpp:.3f} µm/px"
    lines.append(f"  spot diameter: {m.spot_diameter_px:.1f} px   pixel size: {mpp}   scale: {m.scale:g}")
    xy = np.asarray(adata.obsm["spatial"])
    lines.append(
        f"  spot centres: x {xy[:, 0].min():.0f}-{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}-{xy[:, 1].max():.0f} px"
    )
    if "label" in adata.obs:
        counts = Counter(adata.obs["label"].astype(object).where(adata.obs["label"].notna(), "<none>"))
        lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    if m.source:
        lines.append(f"  source: {m.source}")
    return "\n".join(lines)


def _summarize_cohort(cohort: Any) -> str:
    from he2st.data import meta

    slides = list(cohort)
    gene_sets = [set(s.var_names) for s in slides]
    common = set.intersection(*gene_sets) if gene_sets else set()
    union = set.union(*gene_sets) if gene_sets else set()
    n_spots = sum(s.n_obs for s in slides)
    lines = [
        f"cohort {cohort.name!r}: {len(slides)} slides, {len(cohort.patient_ids)} patients, {n_spots} spots; "
        f"genes: {len(common)} in every slide, {len(union)} in any"
    ]
    lines.append(
        f"  {'slide':<12}{'patient':<10}{'spots':>7}{'genes':>8}  {'matrix':<10}{'diam px':>8}{'µm/px':>7}"
        "  labels  image"
    )
    for s in slides:
        m = meta(s)
        mpp = "-" if m.mpp is None else f"{m.mpp:.3f}"
        lab = "yes" if "label" in s.obs else "no"
        image = Path(m.image_path).name if m.image_path else "none"
        lines.append(
            f"  {m.slide_id:<12}{m.patient:<10}{s.n_obs:>7}{s.n_vars:>8}  "
            f"{'counts' if m.counts else 'normalised':<10}{m.spot_diameter_px:>8.1f}{mpp:>7}  {lab:<6}  {image}"
        )
    return "\n".join(lines)


def _image_text(path: str | None) -> str:
    if path is None:
        return "none"
    from he2st.image import image_size

    try:
        w, h = image_size(path)
    except ImageError as exc:
        return f"{path} (unreadable: {exc})"
    return f"{path} ({w} x {h} px)"
