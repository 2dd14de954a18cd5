"""Expression maps of a benchmark run's predictions: one PNG per (method, test slide, gene).

The run's prediction files (``predictions/<method>/<fold>/<slide>.h5ad``) are built by
:func:`he2st.inference.prediction_adata`, so they carry the H&E thumbnail and its scale
factors (``uns["spatial"]``) and the observed values (``layers["observed"]``); the maps
are drawn by the same :func:`he2st.inference.plot_maps` as ``he2st predict --maps``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from he2st.errors import GenePanelError, He2stInputError


def write_run_maps(
    out: str | os.PathLike,
    genes: Sequence[str] | str,
    *,
    methods: Sequence[str] | None = None,
    observed: bool = True,
) -> list[Path]:
    """Draw predicted (and observed) maps of genes for every prediction file of a run.

    Files go to ``<out>/maps/<method>/<slide>_<gene>.png`` and, with ``observed``,
    ``<out>/maps/observed/<slide>_<gene>.png`` (once per slide). Every gene is checked
    against every prediction file before anything is drawn.

    Parameters
    ----------
    out
        The run folder (:func:`he2st.benchmark.run_benchmark`).
    genes
        Gene names, a list or one comma-separated string.
    methods
        Method labels to draw (default: every method of the run).
    observed
        Also draw the observed values stored with the predictions.

    Returns
    -------
    list of pathlib.Path
        The PNG files written.

    Raises
    ------
    he2st.errors.He2stInputError
        Not a run folder, an unknown method label, no prediction files, or files
        written by an he2st without thumbnails (rerun the benchmark).
    he2st.errors.GenePanelError
        A gene missing from a prediction file (named), nothing drawn.
    """
    import anndata as ad

    from he2st.benchmark.run import _safe
    from he2st.evaluate.results import read_run
    from he2st.inference.maps import check_map_genes, plot_maps

    result = read_run(out)
    labels = list(methods) if methods else result.methods
    unknown = sorted(set(labels) - set(result.methods))
    if unknown:
        raise He2stInputError(f"{str(out)!r}: no method {unknown} in this run; it has {result.methods}")
    files = [(label, slide, path) for label in labels for (_, slide), path in result.prediction_files(label).items()]
    if not files:
        raise He2stInputError(f"{str(out)!r}: the run holds no prediction files to draw")
    preds = []
    for label, slide, path in files:
        pred = ad.read_h5ad(path)
        if "spatial" not in pred.uns:
            raise He2stInputError(
                f"{str(path)!r} has no H&E thumbnail (uns['spatial']): it was written by an older he2st; "
                "rerun the benchmark into a new folder to draw maps"
            )
        try:
            wanted = check_map_genes(pred, genes)
        except GenePanelError as exc:
            raise GenePanelError(f"{str(path)!r}: {exc}") from None
        preds.append((label, slide, pred))
    root = Path(out) / "maps"
    written: list[Path] = []
    drawn_observed: set[str] = set()
    for label, slide, pred in preds:
        written += plot_maps(pred, wanted, root / _safe(label), prefix=f"{_safe(slide)}_")
        if observed and "observed" in pred.layers and slide not in drawn_observed:
            written += plot_maps(pred, wanted, root / "observed", prefix=f"{_safe(slide)}_", layer="observed")
            drawn_observed.add(slide)
    return written
