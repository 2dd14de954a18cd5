"""The HTML report: self-contained, every built-in section, pluggable sections."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from he2st.analysis import report as R
from he2st.benchmark.run import run_benchmark


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from he2st.datasets import synthetic

    cohort = synthetic(n_slides=3, n_spots=120, n_genes=20, patch_px=32, seed=0, root=tmp_path_factory.mktemp("syn"))
    out = tmp_path_factory.mktemp("run")
    from he2st.evaluate.metrics import GeneSetSizeWarning

    with pytest.warns(GeneSetSizeWarning, match="20-gene panel"):  # n_top=50 >= 20 genes
        _run(out, cohort)
    return out


def _run(out, cohort):
    run_benchmark(
        {
            "out": str(out),
            "methods": ["mean", "knn"],
            "genes": "all",
            "encoder": "color_stats",
            "method_params": {"knn": {"patch_px": 32}},
            "report": False,
            "quiet": True,
            "name": "tiny <test> run",
        },
        cohort=cohort,
    )


def test_report_is_self_contained_with_all_sections(run_dir) -> None:
    path = R.write_report(run_dir)
    text = path.read_text()
    assert path == run_dir / "report.html"
    for sec in ("overview", "summary", "per_slide", "wilcoxon", "top_genes", "spot_maps"):
        assert f'<section id="{sec}">' in text
    assert "<script" not in text and "http://" not in text and "https://" not in text
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', text)
    assert len(imgs) == 2 + 2  # PCC(ACG)/(HEG) bars + knn's 2 best genes (mean: constant, no PCC)
    spot = text.split('<section id="spot_maps">')[1].split("</section>")[0]
    assert "<h3>knn</h3>" in spot and "<h3>mean</h3>" not in spot
    assert "tiny &lt;test&gt; run" in text  # escaped
    # the summary table shows knn's mean PCC(ACG) as computed in summary.csv
    s = pd.read_csv(run_dir / "summary.csv").set_index(["method", "metric", "gene_set"])
    assert f"{s.loc[('knn', 'pcc', 'ACG'), 'mean']:.3f}" in text
    assert "[n_nan=60]" in text  # mean baseline: 20 genes x 3 slides undefined


def test_sections_are_pluggable(run_dir) -> None:
    @R.register_section("extra_test", order=55, title="Extra")
    def _extra(run):
        return f"<p>methods: {', '.join(run.methods)}</p>"

    @R.register_section("broken_test", order=56)
    def _broken(run):
        raise RuntimeError("boom")

    @R.register_section("skipped_test", order=57)
    def _skipped(run):
        return None

    try:
        assert R.list_sections().index("extra_test") == R.list_sections().index("top_genes") + 1
        text = R.render_report(R.read_run(run_dir))
        assert "<h2>Extra</h2>" in text and "methods: mean, knn" in text
        assert "section failed: RuntimeError: boom" in text and '<section id="summary">' in text
        assert 'id="skipped_test"' not in text
        only = R.render_report(R.read_run(run_dir), sections=["summary"])
        assert '<section id="summary">' in only and '<section id="extra_test">' not in only
        with pytest.raises(Exception, match="unknown report section"):
            R.render_report(R.read_run(run_dir), sections=["nope"])
    finally:
        for name in ("extra_test", "broken_test", "skipped_test"):
            R._SECTIONS.pop(name, None)


def test_missing_run_folder(tmp_path) -> None:
    with pytest.raises(Exception, match="run the benchmark first"):
        R.write_report(tmp_path)


def test_mean_without_pcc_is_left_out_of_top_genes_and_wilcoxon(run_dir) -> None:
    from he2st.evaluate.results import read_run

    run = read_run(run_dir)
    assert "mean" not in set(run.top_genes["method"])
    # mean vs knn: no usable pair for the rank metrics; the error metrics are still compared
    w = run.wilcoxon
    pcc = w[w["metric"].isin(["pcc", "spearman"])]  # AUC of a constant is defined (0.5)
    assert pcc.empty or "mean" not in set(pcc["a"]) | set(pcc["b"])
    assert not w[w["metric"] == "mse"].empty
    text = R.render_report(run)
    assert text.count("predicts the training mean everywhere") == 1
