"""Gene panels: which genes a model predicts, chosen from the training slides only.

The published methods predict a fixed panel of genes. HisToGene, Hist2ST,
THItoGene and mclSTExp build it the same way (mclSTExp supplementary notes,
"Datasets"): keep the genes shared by all training sections, drop genes
detected in fewer than 1,000 spots over all sections, take the top 1,000
highly variable genes (HVG) of each section and keep those in every
section's top list. For her2st this gives the 785-gene list that Hist2ST
ships (``her_hvg_cut_1000.npy``), which :func:`select_genes` accepts as a
fixed ``gene_list``.

:func:`select_genes` reads only the slides it is given. Pass it the
training slides of a split, never the test slides: a panel chosen with the
test slides in view leaks information about them into every model that
uses it. The slide ids it read are recorded in ``panel.params["slides"]``
so a runner can check this.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_write_json, jsonable
from he2st.data.slide import meta, require_counts
from he2st.errors import GenePanelError, He2stInputError

#: HVG flavours accepted by :func:`select_genes` (see ``scanpy.pp.highly_variable_genes``).
HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3")

#: How per-slide HVGs are combined by :func:`select_genes`.
HVG_COMBINE = ("intersect", "union", "batch")

_PANEL_FORMAT = "he2st.GenePanel"


class GenePanel:
    """An ordered list of gene symbols with the recipe that produced it.

    Parameters
    ----------
    genes
        Gene symbols; order is kept (it is the column order of every
        prediction made for the panel). Must be non-empty and unique.
    source
        Short description of where the panel comes from, e.g. ``"hvg"`` or
        ``"gene_list:her_hvg_cut_1000.npy"``.
    params
        JSON-serialisable parameters of the selection (filters, slides read,
        genes that were asked for but missing...).

    Examples
    --------
    >>> panel = GenePanel(["ERBB2", "GNAS"], source="manual")
    >>> panel.save("panel.json"); GenePanel.load("panel.json") == panel
    True
    """

    def __init__(self, genes: Iterable[str], source: str = "", params: dict[str, Any] | None = None) -> None:
        genes = [str(g) for g in genes]
        if not genes:
            raise GenePanelError("a gene panel needs at least one gene")
        seen: set[str] = set()
        dup = [g for g in genes if g in seen or seen.add(g)]  # type: ignore[func-returns-value]
        if dup:
            raise GenePanelError(f"gene panel has duplicated genes: {sorted(set(dup))[:10]}")
        self._genes = genes
        self.source = str(source)
        self.params: dict[str, Any] = dict(params or {})

    # -- sequence-like --------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """Gene symbols in panel order (a copy)."""
        return list(self._genes)

    def __len__(self) -> int:
        return len(self._genes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._genes)

    def __getitem__(self, i: int | slice) -> Any:
        return self._genes[i]

    def __contains__(self, gene: object) -> bool:
        return gene in set(self._genes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GenePanel):
            return NotImplemented
        return self._genes == other._genes and self.source == other.source and jsonable(self.params) == jsonable(
            other.params
        )

    def __hash__(self) -> int:
        return hash(tuple(self._genes))

    def __repr__(self) -> str:
        head = ", ".join(self._genes[:5]) + (", ..." if len(self) > 5 else "")
        return f"GenePanel({len(self)} genes: [{head}], source={self.source!r})"

    # -- helpers --------------------------------------------------------
    def missing_in(self, adata: Any) -> list[str]:
        """Panel genes absent from a slide's ``var_names``, in panel order."""
        present = set(map(str, adata.var_names))
        return [g for g in self._genes if g not in present]

    # -- persistence ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"format", "genes", "source", "params"}``."""
        return {"format": _PANEL_FORMAT, "genes": self.genes, "source": self.source, "params": jsonable(self.params)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the panel as JSON (atomically) and return the path."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GenePanel:
        """Read a panel written by :meth:`save`.

        Raises
        ------
        GenePanelError
            The file is missing, not JSON, or has no ``genes`` list.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise GenePanelError(f"{path}: gene panel file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GenePanelError(f"{path}: not a JSON gene panel ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("genes"), list):
            raise GenePanelError(
                f"{path}: expected a JSON object with a 'genes' list (a file written by GenePanel.save)"
            )
        return cls(data["genes"], source=data.get("source", ""), params=data.get("params") or {})


# -- reading gene lists ------------------------------------------------------


def read_gene_list(source: str | os.PathLike | Sequence[str] | GenePanel) -> list[str]:
    """Gene symbols from a list, a :class:`GenePanel`, or a file.

    Files: ``.npy`` (a 1-d string array; pickled object arrays are refused
    because loading them can run code), ``.json`` (a panel written by
    :meth:`GenePanel.save`, or a plain list), anything else is text with one
    gene per line (blank lines and ``#`` comments ignored). Duplicates are
    dropped, keeping the first occurrence.
    """
    if isinstance(source, GenePanel):
        return source.genes
    if isinstance(source, (str, os.PathLike)):
        genes = _read_gene_file(Path(source))
    else:
        genes = [str(g) for g in source]
    return list(dict.fromkeys(g.strip() for g in genes if g.strip()))


def _read_gene_file(path: Path) -> list[str]:
    if not path.is_file():
        raise GenePanelError(f"{path}: gene list file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise GenePanelError(
                f"{path}: expected a numpy array of strings; object (pickled) arrays are not loaded "
                f"because that can execute code ({exc}). Re-save it with arr.astype(str)."
            ) from None
        if arr.ndim != 1 or arr.dtype.kind not in "US":
            raise GenePanelError(
                f"{path}: expected a 1-d array of gene symbols, got dtype {arr.dtype} shape {arr.shape}"
            )
        return [str(g) for g in arr.tolist()]
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GenePanelError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("genes"), list):
            return [str(g) for g in data["genes"]]
        if isinstance(data, list):
            return [str(g) for g in data]
        raise GenePanelError(f"{path}: expected a JSON list of genes or a saved GenePanel")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise GenePanelError(f"{path}: not a text file with one gene per line ({exc})") from None
    return [ln.split("#", 1)[0].strip() for ln in lines]


# -- selection ---------------------------------------------------------------


def common_genes(slides: Sequence[Any]) -> list[str]:
    """Genes present in every slide, in the first slide's order."""
    slides = list(slides)
    if not slides:
        raise He2stInputError("common_genes needs at least one slide")
    shared = set(map(str, slides[0].var_names))
    for s in slides[1:]:
        shared &= set(map(str, s.var_names))
    return [g for g in map(str, slides[0].var_names) if g in shared]


def detected_spots(slides: Sequence[Any], genes: Sequence[str]) -> np.ndarray:
    """Number of spots with a count > 0 for each gene, summed over the slides.

    Parameters
    ----------
    slides
        Slide AnnDatas; ``.X`` is read (dense or sparse).
    genes
        Genes to count; every one must be present in every slide.

    Returns
    -------
    numpy.ndarray
        int64 ``(n_genes,)``: spots where each gene is detected, over all slides.

    Raises
    ------
    GenePanelError
        When a gene is missing from a slide.
    """
    import scipy.sparse as sp

    total = np.zeros(len(genes), dtype=np.int64)
    for s in slides:
        idx = s.var_names.get_indexer(list(genes))
        if (idx < 0).any():
            missing = [g for g, i in zip(genes, idx) if i < 0][:5]
            raise GenePanelError(f"slide {meta(s).slide_id!r}: genes {missing} are missing")
        X = s.X
        if sp.issparse(X):
            X = X.tocsr()
            per_gene = np.bincount(X.indices[X.data > 0], minlength=s.n_vars)
        else:
            per_gene = (np.asarray(X) > 0).sum(axis=0)
        total += per_gene[idx].astype(np.int64)
    return total


def select_genes(
    train_slides: Sequence[Any],
    *,
    min_spots: int = 1000,
    n_top_hvg: int = 1000,
    combine: str = "intersect",
    hvg_flavor: str = "seurat",
    gene_list: str | os.PathLike | Sequence[str] | GenePanel | None = None,
    markers: Sequence[str] | None = None,
    name: str | None = None,
) -> GenePanel:
    """Choose the gene panel from the TRAINING slides of a split.

    Two modes:

    *HVG mode* (``gene_list=None``; HisToGene / Hist2ST / mclSTExp recipe):

    1. genes present in every training slide;
    2. drop genes detected (count > 0) in fewer than ``min_spots`` spots,
       counted over all training slides together;
    3. in each slide, the ``n_top_hvg`` most variable of the remaining genes,
       by :func:`scanpy.pp.highly_variable_genes` (``flavor=hvg_flavor``) on
       ``log1p(normalize_total(counts))`` of a copy (spot totals over all
       genes, scanpy's default target sum); ``seurat_v3`` is given raw counts;
    4. keep genes in every slide's top list (``combine="intersect"``) or in
       any (``"union"``, BLEEP's choice). The panel is sorted alphabetically,
       so it does not depend on the order of the slides.

    With ``combine="batch"`` (what the benchmark's ``hvg:N`` means) steps 3-4 are
    instead one ranking across the slides: the slides, each normalised as in step
    3, are concatenated on the kept genes with their slide id as a ``batch``
    column and :func:`scanpy.pp.highly_variable_genes` (``batch_key="batch"``,
    ``n_top_genes=n_top_hvg``) ranks the genes by the number of slides where they
    are highly variable, then by normalised dispersion; the panel is its
    ``n_top_hvg`` genes (all kept genes when fewer), sorted alphabetically.

    The intersection shrinks quickly with the number of slides (five her2st
    sections of one patient, ``min_spots=100``: 22 genes), which is why the
    published her2st benchmarks use the fixed 785-gene list instead.

    *Fixed-list mode* (``gene_list`` given, e.g. Hist2ST's
    ``her_hvg_cut_1000.npy``): the listed genes that are present in every
    training slide, in the list's order. Listed genes missing from a slide
    are dropped with a warning and recorded in ``params["missing"]``. No
    count filter is applied, so pre-normalised slides are accepted.

    In both modes ``markers`` present in every slide are kept even when a
    filter removed them (appended at the end if not already in the panel).

    Parameters
    ----------
    train_slides
        The training slides (a :class:`~he2st.data.Cohort` or a list of slide
        AnnData). Only these are read. Do not include test slides.
    min_spots
        Minimum number of training spots (all slides together) in which a
        gene must be detected. 1000 is the published value for her2st-scale
        data (~11k spots); lower it for small cohorts.
    n_top_hvg
        Number of highly variable genes taken per slide (``"batch"``: in all).
    combine
        ``"intersect"`` (published recipe) or ``"union"`` of the per-slide HVG sets, or
        ``"batch"``: scanpy's batch-aware ranking across the slides (exactly
        ``n_top_hvg`` genes when enough pass the filter).
    hvg_flavor
        ``"seurat"`` (default), ``"cell_ranger"`` or ``"seurat_v3"`` (needs scikit-misc).
    gene_list
        A fixed list of genes (list, :class:`GenePanel`, or path to ``.npy``,
        ``.txt`` or ``.json``). Overrides the HVG mode.
    markers
        Genes to keep in any case (e.g. ``["ERBB2", "ESR1"]``).
    name
        Free-text name stored in ``params["name"]``.

    Returns
    -------
    GenePanel
        With ``params`` recording the arguments, the slides read and the
        number of genes left after each step.

    Raises
    ------
    GenePanelError
        Nothing survives (the message names the step that removed the last
        genes), or a fixed list shares no gene with the slides.
    NotCountsError
        HVG mode on slides that do not hold raw counts.
    """
    slides = list(train_slides)
    if not slides:
        raise He2stInputError("select_genes needs at least one training slide")
    ids = [meta(s).slide_id for s in slides]
    if combine not in HVG_COMBINE:
        raise He2stInputError(f"combine must be one of {HVG_COMBINE}, got {combine!r}")
    if hvg_flavor not in HVG_FLAVORS:
        raise He2stInputError(f"hvg_flavor must be one of {HVG_FLAVORS}, got {hvg_flavor!r}")
    if min_spots < 0 or n_top_hvg < 1:
        raise He2stInputError(f"min_spots must be >= 0 and n_top_hvg >= 1 (got {min_spots}, {n_top_hvg})")

    common = common_genes(slides)
    if not common:
        raise GenePanelError(f"the training slides {ids} share no gene (step 1, common genes)")
    params: dict[str, Any] = {"name": name, "slides": ids, "n_common": len(common)}

    if gene_list is not None:
        genes, source = _fixed_list(gene_list, common, ids, params)
    else:
        genes = _hvg_panel(slides, common, ids, min_spots, n_top_hvg, combine, hvg_flavor, params)
        source = "hvg"

    if markers:
        genes = _add_markers(genes, list(markers), set(common), ids, params)
    return GenePanel(genes, source=source, params=params)


def _fixed_list(
    gene_list: Any, common: list[str], ids: list[str], params: dict[str, Any]
) -> tuple[list[str], str]:
    listed = read_gene_list(gene_list)
    if not listed:
        raise GenePanelError(f"gene_list {_describe(gene_list)} is empty")
    shared = set(common)
    genes = [g for g in listed if g in shared]
    missing = [g for g in listed if g not in shared]
    params.update(gene_list=_describe(gene_list), n_listed=len(listed), missing=missing)
    if not genes:
        raise GenePanelError(
            f"none of the {len(listed)} genes of gene_list {_describe(gene_list)} is present in every "
            f"training slide {ids} (e.g. {listed[:5]}); are the gene symbols of the same kind "
            "(symbols vs Ensembl ids, human vs mouse)?"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(listed)} genes of gene_list {_describe(gene_list)} are missing from at "
            f"least one training slide and are dropped: {missing[:10]}{' ...' if len(missing) > 10 else ''}",
            stacklevel=3,
        )
    source = "gene_list" if not isinstance(gene_list, (str, os.PathLike)) else f"gene_list:{Path(gene_list).name}"
    return genes, source


def _describe(gene_list: Any) -> str:
    if isinstance(gene_list, (str, os.PathLike)):
        return str(gene_list)
    if isinstance(gene_list, GenePanel):
        return f"GenePanel(source={gene_list.source!r})"
    return f"<list of {len(list(gene_list))}>"


def _hvg_panel(
    slides: list[Any],
    common: list[str],
    ids: list[str],
    min_spots: int,
    n_top_hvg: int,
    combine: str,
    flavor: str,
    params: dict[str, Any],
) -> list[str]:
    for s in slides:
        require_counts(s, "gene selection by detection and highly variable genes")
    n_spots = sum(s.n_obs for s in slides)
    detected = detected_spots(slides, common)
    kept = [g for g, d in zip(common, detected) if d >= min_spots]
    params.update(
        min_spots=min_spots, n_top_hvg=n_top_hvg, combine=combine, hvg_flavor=flavor, n_after_min_spots=len(kept)
    )
    if not kept:
        raise GenePanelError(
            f"min_spots={min_spots} removed all {len(common)} common genes of the training slides {ids} "
            f"(step 2): the most widely detected gene is found in {int(detected.max())} of {n_spots} spots. "
            "Lower min_spots for a small cohort."
        )
    if combine == "batch":
        chosen = _batch_hvg(slides, ids, kept, n_top_hvg, flavor)
        params["n_selected"] = len(chosen)
        return sorted(chosen)
    per_slide = [_top_hvg(s, kept, n_top_hvg, flavor) for s in slides]
    if combine == "intersect":
        chosen = set.intersection(*per_slide)
    else:
        chosen = set.union(*per_slide)
    params["n_hvg_per_slide"] = {i: len(h) for i, h in zip(ids, per_slide)}
    params["n_selected"] = len(chosen)
    if not chosen:
        raise GenePanelError(
            f"the per-slide top {n_top_hvg} highly variable genes of {ids} have no gene in common (step 4, "
            "intersect); use combine='union' or a larger n_top_hvg"
        )
    return sorted(chosen)


def _hvg_input(slide: Any, genes: list[str], flavor: str) -> Any:
    """A bare copy of the slide on ``genes``, on the scale scanpy's HVG ``flavor`` expects."""
    import anndata as ad
    import scanpy as sc

    # A bare copy: scanpy must not touch the caller's slide (nor its uns/obsm).
    work = ad.AnnData(X=slide.X.copy())
    work.var_names = slide.var_names.astype(str)
    work.obs_names = slide.obs_names.astype(str)
    if flavor != "seurat_v3":
        # Totals over all genes of the slide (as CPM normalisation does), then restrict to the candidates.
        sc.pp.normalize_total(work)
        sc.pp.log1p(work)
    return work[:, genes].copy()


def _batch_hvg(slides: list[Any], ids: list[str], genes: list[str], n_top: int, flavor: str) -> set[str]:
    """scanpy's batch-aware ``highly_variable_genes`` over the slides concatenated on ``genes``."""
    if len(genes) <= n_top:
        return set(genes)
    import anndata as ad
    import scanpy as sc

    parts = {sid: _hvg_input(s, genes, flavor) for sid, s in zip(ids, slides)}
    both = ad.concat(parts, label="batch", index_unique="-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-dispersion genes in a batch rank last anyway
        sc.pp.highly_variable_genes(both, n_top_genes=n_top, flavor=flavor, batch_key="batch")
    return set(both.var_names[both.var["highly_variable"].to_numpy()])


def _top_hvg(slide: Any, genes: list[str], n_top: int, flavor: str) -> set[str]:
    """The ``n_top`` most variable of ``genes`` in one slide."""
    if len(genes) <= n_top:
        return set(genes)
    import scanpy as sc

    sub = _hvg_input(slide, genes, flavor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy warns about genes with zero dispersion; those rank last anyway
        sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor=flavor)
    return set(sub.var_names[sub.var["highly_variable"].to_numpy()])


def _add_markers(
    genes: list[str], markers: list[str], shared: set[str], ids: list[str], params: dict[str, Any]
) -> list[str]:
    present = [m for m in dict.fromkeys(map(str, markers)) if m in shared]
    absent = [m for m in dict.fromkeys(map(str, markers)) if m not in shared]
    params["markers"] = list(map(str, markers))
    params["markers_missing"] = absent
    if absent:
        warnings.warn(f"markers missing from at least one training slide {ids}: {absent}", stacklevel=3)
    have = set(genes)
    return genes + [m for m in present if m not in have]


__all__ = ["GenePanel", "HVG_COMBINE", "HVG_FLAVORS", "common_genes", "detected_spots", "read_gene_list", "select_genes"]
