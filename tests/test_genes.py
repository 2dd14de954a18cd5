"""Gene panels: common genes, detection filter, per-slide HVGs, fixed lists, markers, persistence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from he2st.data import make_slide
from he2st.pp import GenePanel, select_genes
from he2st.errors import GenePanelError, He2stInputError, NotCountsError


def _slide(sid, genes, X, counts=True):
    X = np.asarray(X, dtype=float)
    n = X.shape[0]
    xy = np.column_stack([np.arange(n) * 10.0 + 5, np.full(n, 5.0)])
    return make_slide(X, [f"s{i}" for i in range(n)], genes, xy, slide_id=sid, spot_diameter_px=5.0, counts=counts)


def _tiny_pair():
    # A: G1..G5, B: G2..G6 -> common G2..G5 (A's order).
    a = _slide("A", ["G1", "G2", "G3", "G4", "G5"], [[1, 1, 0, 2, 1], [1, 2, 0, 0, 1], [0, 1, 1, 3, 1]])
    b = _slide("B", ["G6", "G5", "G4", "G3", "G2"], [[1, 1, 1, 0, 1], [2, 0, 2, 0, 3]])
    return a, b


def test_common_genes_and_min_spots_filter():
    a, b = _tiny_pair()
    # Spots with count > 0 over both slides: G2 3+2=5, G3 1+0=1, G4 2+2=4, G5 3+1=4.
    panel = select_genes([a, b], min_spots=4, n_top_hvg=100)
    assert panel.genes == ["G2", "G4", "G5"]  # sorted; G3 (1 spot) dropped
    assert panel.params["n_common"] == 4 and panel.params["n_after_min_spots"] == 3
    assert panel.params["slides"] == ["A", "B"] and panel.source == "hvg"
    assert select_genes([a, b], min_spots=5, n_top_hvg=100).genes == ["G2"]
    assert select_genes([a, b], min_spots=0, n_top_hvg=100).genes == ["G2", "G3", "G4", "G5"]


def test_nothing_survives_says_which_step():
    a, b = _tiny_pair()
    with pytest.raises(GenePanelError, match=r"min_spots=6 removed all 4 common genes.*step 2.*5 of 5 spots"):
        select_genes([a, b], min_spots=6)
    c = _slide("C", ["X1", "X2"], [[1, 2]])
    with pytest.raises(GenePanelError, match="share no gene"):
        select_genes([a, c])


def _hvg_cohort():
    rng = np.random.default_rng(0)
    genes = [f"G{i:03d}" for i in range(200)]
    slides = []
    for k in range(3):
        n = 60
        # Means spread over a range (seurat bins genes by mean); every 8th gene of the
        # first 160 switches between two spot groups, the others are flat Poisson.
        mu = np.tile(np.geomspace(3, 40, 200), (n, 1))
        group = rng.random(n) < 0.5
        variable = np.arange(0, 160, 8)
        mu[:, variable] *= np.where(group, 1.8, 0.2)[:, None]
        mu[:, 160:] = rng.uniform(0.05, 0.2)  # rarely detected genes, for the min_spots filter
        slides.append(_slide(f"S{k}", genes, rng.poisson(mu)))
    return slides, genes


def _scanpy_by_hand(slide, genes, n_top):
    import anndata as ad
    import scanpy as sc

    work = ad.AnnData(slide.X.copy())
    work.var_names = slide.var_names
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    sub = work[:, genes].copy()
    sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor="seurat")
    return set(sub.var_names[sub.var["highly_variable"]])


def test_hvg_intersect_and_union_match_scanpy_by_hand():
    slides, genes = _hvg_cohort()
    detected = sum(np.asarray((s.X > 0).sum(axis=0)).ravel() for s in slides)
    kept = [g for g, d in zip(genes, detected) if d >= 40]
    assert 150 < len(kept) < 200  # the filter really removes the rare genes
    by_hand = [_scanpy_by_hand(s, kept, 25) for s in slides]

    inter = select_genes(slides, min_spots=40, n_top_hvg=25)
    union = select_genes(slides, min_spots=40, n_top_hvg=25, combine="union")
    assert inter.genes == sorted(set.intersection(*by_hand))
    assert union.genes == sorted(set.union(*by_hand))
    # The intersection keeps only truly variable genes (18 of the 20; the two with the
    # lowest mean fall in a low-mean bin where seurat's dispersion rank is noisy).
    variable = {genes[i] for i in range(0, 160, 8)}
    assert set(inter.genes) <= variable and len(inter) >= 15
    assert len(union) > len(inter)
    assert inter.params["n_hvg_per_slide"] == {"S0": 25, "S1": 25, "S2": 25}
    # Slide order does not change the panel.
    assert select_genes(slides[::-1], min_spots=40, n_top_hvg=25).genes == inter.genes


def test_fixed_list_keeps_order_and_reports_missing(tmp_path):
    a, b = _tiny_pair()
    listed = ["G5", "GX", "G2", "G1", "G3"]  # GX nowhere, G1 only in A
    with pytest.warns(UserWarning, match=r"2 of 5 genes.*\['GX', 'G1'\]"):
        panel = select_genes([a, b], gene_list=listed)
    assert panel.genes == ["G5", "G2", "G3"]
    assert panel.params["missing"] == ["GX", "G1"] and panel.source == "gene_list"

    npy = tmp_path / "genes.npy"
    np.save(npy, np.array(listed))
    txt = tmp_path / "genes.txt"
    txt.write_text("# my panel\nG5\nGX\n\nG2\nG1\nG3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert select_genes([a, b], gene_list=npy).genes == ["G5", "G2", "G3"]
        assert select_genes([a, b], gene_list=str(txt)).genes == ["G5", "G2", "G3"]
        assert select_genes([a, b], gene_list=npy).source == "gene_list:genes.npy"

    with pytest.raises(GenePanelError, match="none of the 2 genes"):
        select_genes([a, b], gene_list=["GX", "GY"])
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array(["G2", None], dtype=object), allow_pickle=True)
    with pytest.raises(GenePanelError, match="pickled"):
        select_genes([a, b], gene_list=pickled)


def test_markers_are_kept_and_missing_ones_reported():
    a, b = _tiny_pair()
    with pytest.warns(UserWarning, match="markers missing"):
        panel = select_genes([a, b], min_spots=4, n_top_hvg=100, markers=["G3", "G2", "G1"])
    # G3 failed min_spots but is a marker: appended; G2 already in; G1 not in B.
    assert panel.genes == ["G2", "G4", "G5", "G3"]
    assert panel.params["markers_missing"] == ["G1"]


def test_counts_required_for_hvg_but_not_for_a_fixed_list():
    a = _slide("N", ["G1", "G2"], [[0.5, 1.5], [2.0, 0.1]], counts=False)
    with pytest.raises(NotCountsError, match="'N'"):
        select_genes([a], min_spots=0)
    assert select_genes([a], gene_list=["G2"]).genes == ["G2"]


def test_panel_save_load_and_equality(tmp_path):
    a, b = _tiny_pair()
    panel = select_genes([a, b], min_spots=4, n_top_hvg=100, name="tiny")
    path = panel.save(tmp_path / "panel.json")
    back = GenePanel.load(path)
    assert back == panel and back.genes == ["G2", "G4", "G5"] and back.params["name"] == "tiny"
    assert GenePanel(["G2", "G4", "G5"], source="hvg") != panel  # params differ
    assert GenePanel(["B", "A"]) != GenePanel(["A", "B"])  # order matters
    assert list(panel) == panel.genes and len(panel) == 3 and "G4" in panel
    assert panel.missing_in(a) == [] and GenePanel(["G6", "G2"]).missing_in(a) == ["G6"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GenePanelError, match="bad.json"):
        GenePanel.load(tmp_path / "bad.json")
    with pytest.raises(GenePanelError, match="duplicated"):
        GenePanel(["A", "B", "A"])
    with pytest.raises(GenePanelError, match="at least one gene"):
        GenePanel([])


@pytest.mark.realdata
def test_her2st_785_gene_list(her2st_root):
    import he2st

    cohort = he2st.datasets.her2st(root=her2st_root, sections=["C2", "C3", "C4", "C5", "C6"])
    listed = [str(g) for g in np.load(her2st_root / "hist2st" / "her_hvg_cut_1000.npy")]
    assert len(listed) == 785
    panel = select_genes(cohort, gene_list=her2st_root / "hist2st" / "her_hvg_cut_1000.npy")
    assert panel.genes == listed  # every listed gene is in C2-C6, in the list's order
    assert panel.params["missing"] == [] and panel.params["slides"] == ["C2", "C3", "C4", "C5", "C6"]
    # The published min_spots=1000 cannot be met by 910 spots: the error says so.
    with pytest.raises(GenePanelError, match=r"min_spots=1000.*of 910 spots"):
        select_genes(cohort)


def test_batch_hvg_has_n_genes_and_equals_scanpy_batch_ranking():
    import anndata as ad
    import scanpy as sc

    slides, genes = _hvg_cohort()
    detected = sum(np.asarray((s.X > 0).sum(axis=0)).ravel() for s in slides)
    kept = [g for g, d in zip(genes, detected) if d >= 40]
    panel = select_genes(slides, min_spots=40, n_top_hvg=25, combine="batch")
    assert len(panel) == 25 and panel.genes == sorted(panel.genes)
    # scanpy by hand: each slide normalised over all its genes, concatenated on the kept genes.
    parts = {}
    for s in slides:
        work = ad.AnnData(s.X.copy())
        work.var_names = s.var_names
        sc.pp.normalize_total(work)
        sc.pp.log1p(work)
        parts[s.uns["he2st"]["slide_id"]] = work[:, kept].copy()
    both = ad.concat(parts, label="batch", index_unique="-")
    sc.pp.highly_variable_genes(both, n_top_genes=25, flavor="seurat", batch_key="batch")
    assert set(panel.genes) == set(both.var_names[both.var["highly_variable"]])
    # Unlike the intersection, the batch ranking does not shrink below N.
    assert len(select_genes(slides, min_spots=40, n_top_hvg=25)) < 25


def test_choose_panel_hvg_spec_means_batch_and_intersect_is_explicit():
    from he2st.evaluate.protocol import check_gene_spec, choose_panel

    slides, _ = _hvg_cohort()
    hvg = choose_panel(slides, "hvg:25", min_spots=40)
    inter = choose_panel(slides, "hvg_intersect:25", min_spots=40)
    assert len(hvg) == 25 and hvg.params["combine"] == "batch"
    assert inter.params["combine"] == "intersect"
    assert inter.genes == select_genes(slides, min_spots=40, n_top_hvg=25).genes
    check_gene_spec("hvg_intersect:10")
    with pytest.raises(He2stInputError, match="hvg_intersect"):
        check_gene_spec("hvg_intersect:x")
