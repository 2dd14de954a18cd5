"""The seed papers' downstream analyses (he2st.analysis.analyses) and ``he2st analyze``."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import hypergeom
from typer.testing import CliRunner

from he2st.analysis.analyses import (
    differential_expression,
    enrichment,
    gene_gene_correlation,
    read_gmt,
    region_detection,
)
from he2st.benchmark.run import run_benchmark
from he2st.cli import app
from he2st.errors import He2stInputError


def _slide(n_spots: int = 80, n_genes: int = 12, seed: int = 0) -> ad.AnnData:
    """Two regions with different programmes; X predicted, layers['observed'] measured."""
    rng = np.random.default_rng(seed)
    lab = np.array(["tumor"] * (n_spots // 2) + ["stroma"] * (n_spots - n_spots // 2))
    base = rng.normal(size=(n_spots, n_genes))
    base[lab == "tumor", :4] += 3.0
    obs = base + 5.0
    a = ad.AnnData(obs.astype(np.float32), obs=pd.DataFrame({"label": lab}, index=[f"s{i}" for i in range(n_spots)]))
    a.var_names = [f"G{j}" for j in range(n_genes)]
    a.layers["observed"] = obs.astype(np.float32)
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n_spots, 2))
    return a


@pytest.mark.parametrize("kind", ["HEG", "HVG"])
def test_gene_gene_correlation_of_a_perfect_prediction_is_1(kind) -> None:
    a = _slide()
    g = gene_gene_correlation(None, a, n_top=8, kind=kind)
    assert g.r == pytest.approx(1.0)
    assert len(g.genes) == 8 and list(g.observed.index) == g.genes == list(g.predicted.columns)
    np.testing.assert_allclose(g.observed.to_numpy(), g.predicted.to_numpy())
    # A noisy prediction is below 1; the order follows the OBSERVED matrix only.
    b = a.copy()
    b.X = b.X + np.random.default_rng(1).normal(scale=2.0, size=b.shape).astype(np.float32)
    g2 = gene_gene_correlation(None, b, n_top=8, kind=kind)
    assert g2.r < 0.999 and g2.genes == g.genes


def test_region_detection_ari_of_a_relabelled_clustering_is_1() -> None:
    a = _slide()
    # Labels that are a relabelling of the observed k-means clusters: ARI = NMI = 1.
    ref = region_detection(a, labels=None, method="kmeans", n_clusters=2)
    assert ref["reference_kind"] == "observed_clusters" and ref["ari"] == pytest.approx(1.0)
    relabelled = np.array(["zone-" + "ab"[1 - c] for c in ref["observed"]])
    res = region_detection(a, labels=relabelled, method="kmeans")
    assert res["reference_kind"] == "labels" and res["n_clusters"] == 2
    assert res["ari"] == pytest.approx(1.0) and res["nmi"] == pytest.approx(1.0)
    # obs["label"] (two planted regions) by default; Leiden (scanpy) too.
    lab = region_detection(a, method="leiden")
    assert lab["reference_kind"] == "labels" and lab["ari"] > 0.5 and len(lab["predicted"]) == a.n_obs


def test_differential_expression_finds_the_planted_genes() -> None:
    a = _slide()
    de = differential_expression(a, "label", "tumor", n_top=4)
    assert set(de["gene"]) == {"G0", "G1", "G2", "G3"} and list(de["rank"]) == [1, 2, 3, 4]
    with pytest.raises(He2stInputError, match="no spot"):
        differential_expression(a, "label", "necrosis")


def test_ora_p_value_is_the_hypergeometric_test(tmp_path) -> None:
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("UP\tplanted\tG0\tG1\tG2\tG3\tG9\nOTHER\tx\tG5\tG6\tG7\tNOT_IN_PANEL\nNONE\tx\tZZZ\n")
    sets = read_gmt(gmt)
    assert sets["OTHER"] == ["G5", "G6", "G7", "NOT_IN_PANEL"]
    universe = [f"G{j}" for j in range(20)]
    res = enrichment(["G0", "G1", "G2", "G5"], sets, universe).set_index("gene_set")
    assert "NONE" not in res.index  # no gene in the universe
    for name, n, k in (("UP", 5, 3), ("OTHER", 3, 1)):
        assert res.loc[name, "overlap"] == k and res.loc[name, "set_size"] == n
        assert res.loc[name, "pvalue"] == pytest.approx(hypergeom.sf(k - 1, 20, n, 4), rel=1e-9)
    assert res.loc["UP", "genes"] == "G0;G1;G2"
    bad = tmp_path / "bad.gmt"
    bad.write_text("ONLYNAME\n")
    with pytest.raises(He2stInputError, match="line 1"):
        read_gmt(bad)


def test_he2st_analyze_adds_tables_and_report_sections(tmp_path) -> None:
    out = tmp_path / "run"
    run_benchmark({
        "out": str(out), "data": "synthetic",
        "data_params": {"n_slides": 3, "n_spots": 60, "n_genes": 20, "patch_px": 32, "seed": 0},
        "methods": ["mean", {"name": "ridge", "params": {"encoder": "color_stats", "weights": None, "patch_px": 32}}],
        "split": "loso", "genes": "all", "n_top": 10, "quiet": True,
    })
    report = (out / "report.html").read_text()
    assert 'id="gene_gene"' not in report  # before: the sections are left out
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("A\tx\tGENE000\tGENE001\tGENE002\tGENE003\nB\tx\tGENE010\tGENE011\tGENE012\n")
    result = CliRunner().invoke(app, ["analyze", str(out), "--gmt", str(gmt), "--group", "tumor", "--n-top", "10"])
    assert result.exit_code == 0, result.output
    root = out / "analyses"
    for name in ("metrics", "gene_gene", "regions", "clusters", "de", "de_overlap", "enrichment"):
        assert (root / f"{name}.csv").is_file(), name
    m = pd.read_csv(root / "metrics.csv")
    assert set(m["metric"]) == {"gene_gene_r", "region_ari", "region_nmi"}
    assert set(m["gene_set"]) == {"HEG", "HVG", "kmeans", "leiden"}
    ridge = m[(m["method"] == "ridge") & (m["metric"] == "gene_gene_r")]["value"]
    assert len(ridge) == 6 and ridge.notna().all()
    reg = pd.read_csv(root / "regions.csv")
    assert set(reg["reference"]) == {"labels"}  # the synthetic slides carry region labels
    en = pd.read_csv(root / "enrichment.csv")
    assert {"observed", "ridge"} <= set(en["method"])
    # the mean baseline predicts a constant: no DE list of its own; lists are a fifth of the 20-gene panel
    ov = pd.read_csv(root / "de_overlap.csv")
    assert set(ov["method"]) == {"ridge"} and (ov["n_top"] == 5).all() and (ov["n_predicted"] == 5).all()
    assert "mean" not in set(en["method"])
    assert json.loads((root / "params.json").read_text())["de_skipped_constant"] == ["mean"]
    report = (out / "report.html").read_text()
    for sec in ("gene_gene", "regions", "de"):
        assert f'id="{sec}"' in report, sec
    assert "section failed" not in report
    assert report.count("data:image/png") >= 4
    # Not a run folder: one error line, nothing created.
    bad = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not a finished run folder" in bad.output
    assert not (tmp_path / "nope").exists()
