"""Benchmark runner: run folder, determinism, resume (also after a kill), CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from he2st.benchmark.run import BenchmarkConfig, RunConfigError, run_benchmark

SYN = {"n_slides": 3, "n_spots": 120, "n_genes": 20, "patch_px": 32, "seed": 0}


def _config(out, syn_root, **kw) -> dict:
    d = {
        "out": str(out),
        "data": "synthetic",
        "data_params": {**SYN, "root": syn_root},
        "methods": ["mean", "ridge", "knn"],
        "genes": "all",
        "encoder": "color_stats",
        "method_params": {"ridge": {"patch_px": 32}, "knn": {"patch_px": 32, "k": 10}},
        "quiet": True,
    }
    d.update(kw)
    return d


def test_run_folder_contents(tmp_path, syn_root) -> None:
    res = run_benchmark(_config(tmp_path / "run", syn_root))
    out = tmp_path / "run"
    assert res.folds_run == 9 and res.folds_skipped == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["split"] == "loso" and cfg["cohort"]["slides"] == ["syn0", "syn1", "syn2"]
    assert "numpy" in cfg["versions"] and cfg["seeds"]["methods"] == 0
    m = pd.read_csv(out / "metrics.csv")
    for col in ("method", "fold", "test_slide", "metric", "gene_set", "value", "n_nan"):
        assert col in m.columns
    assert set(m["method"]) == {"mean", "ridge", "knn"} and set(m["test_slide"]) == {"syn0", "syn1", "syn2"}
    assert {"pcc", "mse", "mae", "rmse", "ari", "nmi"} <= set(m["metric"])
    mean_pcc = m[(m["method"] == "mean") & (m["metric"] == "pcc") & (m["gene_set"] == "ACG")]
    assert mean_pcc["value"].isna().all() and (mean_pcc["n_nan"] == 20).all()
    g = pd.read_csv(out / "per_gene.csv")
    assert len(g) == 3 * 3 * 20 and {"method", "test_slide", "gene", "pcc", "pvalue"} <= set(g.columns)
    s = pd.read_csv(out / "summary.csv").set_index(["method", "metric", "gene_set"])
    ridge_slides = m[(m["method"] == "ridge") & (m["metric"] == "pcc") & (m["gene_set"] == "ACG")]["value"]
    assert s.loc[("ridge", "pcc", "ACG"), "mean"] == pytest.approx(ridge_slides.mean())
    assert s.loc[("ridge", "pcc", "ACG"), "sd"] == pytest.approx(ridge_slides.std(ddof=1))
    assert s.loc[("ridge", "pcc", "ACG"), "mean"] > 0.2
    a = ad.read_h5ad(out / "predictions" / "knn" / "syn1.h5ad")
    assert a.shape == (120, 20) and "observed" in a.layers and a.obsm["spatial"].shape == (120, 2)
    assert "uncertainty" not in a.layers
    rows = g[(g["method"] == "knn") & (g["test_slide"] == "syn1")].set_index("gene")
    j = 3
    r = np.corrcoef(a.layers["observed"][:, j], a.X[:, j])[0, 1]
    assert rows.loc[a.var_names[j], "pcc"] == pytest.approx(r, abs=1e-5)
    assert (out / "report.html").is_file() and (out / "wilcoxon.csv").is_file()
    assert res.table().loc["ridge", "PCC(ACG)"] == pytest.approx(s.loc[("ridge", "pcc", "ACG"), "mean"])


def test_same_seed_same_metrics_and_resume(tmp_path, syn_root) -> None:
    cfg = _config(tmp_path / "a", syn_root, methods=["ridge", "knn"], split="kfold:3", seed=7)
    r1 = run_benchmark(cfg)
    r2 = run_benchmark({**cfg, "out": str(tmp_path / "b")})
    pd.testing.assert_frame_equal(r1.metrics, r2.metrics)
    pd.testing.assert_frame_equal(r1.per_gene, r2.per_gene)
    again = run_benchmark(cfg)
    assert again.folds_run == 0 and again.folds_skipped == 6
    pd.testing.assert_frame_equal(again.metrics, r1.metrics)
    # a different configuration in the same folder is refused, naming what changed
    with pytest.raises(RunConfigError, match="seed"):
        run_benchmark({**cfg, "seed": 8})
    with pytest.raises(RunConfigError, match=r"method 'knn'.*\['k'\]"):
        run_benchmark({**cfg, "method_params": {**cfg["method_params"], "knn": {"k": 3}}})
    # ... but methods can be added: only their folds run, the tables hold all methods
    more = run_benchmark({**cfg, "methods": ["ridge", "knn", "mean"]})
    assert more.folds_run == 3 and more.folds_skipped == 6
    assert list(dict.fromkeys(more.metrics["method"])) == ["ridge", "knn", "mean"]
    pd.testing.assert_frame_equal(
        more.metrics[more.metrics["method"] != "mean"].reset_index(drop=True), r1.metrics
    )
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())["methods"]
    assert [m["label"] for m in recorded] == ["ridge", "knn", "mean"]


def test_bad_configs(tmp_path, syn_root) -> None:
    with pytest.raises(RunConfigError, match="unknown key"):
        BenchmarkConfig.from_dict({"metods": ["mean"]})
    with pytest.raises(RunConfigError, match="unknown parameter"):
        run_benchmark(_config(tmp_path / "x", syn_root, method_params={"knn": {"kk": 3}}))
    with pytest.raises(Exception, match="unknown method"):
        run_benchmark(_config(tmp_path / "y", syn_root, methods=["nope"]))
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["syn0", "synX"], "test": ["syn2"]}))
    with pytest.raises(Exception, match="synX"):
        run_benchmark(_config(tmp_path / "z", syn_root, split=str(bad)))
    assert not (tmp_path / "z" / "metrics.csv").exists()


def test_named_split_with_validation_and_nested_grid(tmp_path, syn_root) -> None:
    split = tmp_path / "ood.toml"
    split.write_text('train = ["syn0"]\nvalidation = ["syn1"]\ntest = ["syn2"]\n')
    res = run_benchmark(_config(tmp_path / "named", syn_root, methods=["knn"], split=str(split)))
    assert set(res.metrics["fold"]) == {"ood"} and set(res.metrics["test_slide"]) == {"syn2"}
    rec = json.loads((tmp_path / "named" / "folds" / "knn" / "ood.json").read_text())
    # A split file scores its validation slides (Jiang et al.'s OOD protocol): the method never sees them.
    assert rec["fold"]["validation_mode"] == "score" and rec["extra"]["bank_slides"] == ["syn0"]
    assert rec["panel"]["params"]["slides"] == ["syn0"]
    # ... and the scored validation slide has its own tables in the run folder.
    val = pd.read_csv(tmp_path / "named" / "validation_metrics.csv")
    assert set(val["test_slide"]) == {"syn1"} and set(val["method"]) == {"knn"}
    assert (tmp_path / "named" / "validation_summary.csv").is_file()
    split.write_text('train = ["syn0"]\nvalidation = ["syn1"]\ntest = ["syn2"]\nvalidation_mode = "select"\n')
    run_benchmark(_config(tmp_path / "select", syn_root, methods=["knn"], split=str(split)))
    rec = json.loads((tmp_path / "select" / "folds" / "knn" / "ood.json").read_text())
    assert rec["extra"]["bank_slides"] == ["syn0", "syn1"]  # validation slides join the bank
    assert rec["panel"]["params"]["slides"] == ["syn0"]  # ... but not the panel choice
    assert not (tmp_path / "select" / "validation_metrics.csv").exists()

    res = run_benchmark(
        _config(tmp_path / "nested", syn_root, methods=["knn"], split="nested", grid={"knn": {"k": [1, 30]}})
    )
    rec = json.loads((tmp_path / "nested" / "folds" / "knn" / "syn0.json").read_text())
    sel = rec["selection"]
    assert sel["inner_folds"] == ["syn0-inner-syn1", "syn0-inner-syn2"]
    assert [c["params"]["k"] for c in sel["candidates"]] == [1, 30]
    best = max(sel["candidates"], key=lambda c: c["inner_pcc_acg"])
    assert rec["params"]["k"] == best["params"]["k"] == sel["best"]["k"]
    # the run resumes: the stored k is the inner CV's choice, not a changed default
    again = run_benchmark(
        _config(tmp_path / "nested", syn_root, methods=["knn"], split="nested", grid={"knn": {"k": [1, 30]}})
    )
    assert again.folds_run == 0 and again.folds_skipped == 3


_SLOW_METHOD = textwrap.dedent(
    """
    import os, time
    from he2st.methods import register_method
    from he2st.methods.baselines import MeanPredictor

    @register_method("slow_mean")
    class SlowMean(MeanPredictor):
        \"\"\"The mean baseline, sleeping $SLOW_S seconds per predicted slide (to kill a run mid-way).\"\"\"

        def predict(self, slide):
            time.sleep(float(os.environ.get("SLOW_S", "0")))
            return super().predict(slide)
    """
)
@pytest.fixture
def slow_mean():
    """Register ``slow_mean`` in this process too (for the in-process rerun), then remove it."""
    from he2st.methods.registry import _REGISTRY

    exec(compile(_SLOW_METHOD, "<slow_mean>", "exec"), {})
    yield
    _REGISTRY.pop("slow_mean", None)


def test_resume_after_kill(tmp_path, syn_root, monkeypatch, slow_mean) -> None:
    from typer.testing import CliRunner

    from he2st.cli import app
    from he2st.benchmark.run import load_config

    toml = tmp_path / "run.toml"
    toml.write_text(
        textwrap.dedent(
            f"""
            data = "synthetic"
            methods = ["slow_mean"]
            genes = "all"
            quiet = true
            [data_params]
            n_slides = 3
            n_spots = 120
            n_genes = 20
            patch_px = 32
            root = "{syn_root}"
            """
        )
    )
    out = tmp_path / "killed"
    script = _SLOW_METHOD + "\nimport sys\nfrom he2st.cli import app\napp(sys.argv[1:], prog_name='he2st')\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "benchmark", "--config", str(toml), "--out", str(out), "--quiet"],
        env={**os.environ, "SLOW_S": "2"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    marker_dir = out / "folds" / "slow_mean"
    deadline = time.time() + 120
    while time.time() < deadline and not list(marker_dir.glob("*.json")):
        if proc.poll() is not None:
            pytest.fail(f"benchmark ended early: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait()
    done = sorted(p.name for p in marker_dir.glob("*.json"))
    assert 1 <= len(done) < 3, done
    assert not (out / "metrics.csv").exists()
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no half-written files left behind

    monkeypatch.setenv("SLOW_S", "0")
    res = CliRunner().invoke(app, ["benchmark", "--config", str(toml), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{3 - len(done)} method x fold pairs run, {len(done)} resumed" in res.output
    ref = run_benchmark(load_config(toml, out=str(tmp_path / "ref")))
    assert ref.folds_run == 3
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), pd.read_csv(tmp_path / "ref" / "metrics.csv"))


def test_cli_benchmark_tiny(tmp_path, syn_root) -> None:
    from typer.testing import CliRunner

    from he2st.cli import app

    toml = tmp_path / "run.toml"
    toml.write_text(
        f'genes = "all"\nencoder = "color_stats"\n[data_params]\nn_slides = 3\nn_spots = 120\nn_genes = 20\n'
        f'patch_px = 32\nroot = "{syn_root}"\n[method_params.ridge]\npatch_px = 32\n'
    )
    res = CliRunner().invoke(
        app, ["benchmark", "--data", "synthetic", "--methods", "mean,ridge", "--split", "kfold:3",
              "--config", str(toml), "--out", str(tmp_path / "cli"), "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert "ridge" in res.output and "PCC(ACG)" in res.output and "report:" in res.output
    m = pd.read_csv(tmp_path / "cli" / "metrics.csv")
    assert set(m["fold"]) == {"fold0", "fold1", "fold2"}
    bad = CliRunner().invoke(app, ["benchmark", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_method_params_resolution() -> None:
    spec = BenchmarkConfig.from_dict({"methods": ["ridge", "mean"], "encoder": "color_stats", "seed": 3}).method_specs()
    assert spec[0].params == {"seed": 3, "encoder": "color_stats", "weights": None, "patch_px": 32}
    assert spec[1].params == {"seed": 3}  # the mean baseline takes no encoder settings
    real = BenchmarkConfig.from_dict(
        {"data": "her2st", "methods": [{"name": "knn", "label": "knn10", "params": {"k": 10}}],
         "encoder": "efficientnet_lite0", "method_params": {"knn10": {"metric": "euclidean"}}}
    ).method_specs()[0]
    assert real.label == "knn10" and real.name == "knn"
    assert real.params == {"seed": 0, "encoder": "efficientnet_lite0", "weights": "imagenet", "k": 10, "metric": "euclidean"}
    with pytest.raises(RunConfigError, match="appear twice"):
        BenchmarkConfig.from_dict({"methods": ["knn", {"name": "ridge", "label": "knn"}]})


@pytest.mark.parametrize("mode", ["score", "select"])
def test_run_fold_validation_modes(cohort, mode) -> None:
    from he2st.evaluate.protocol import run_fold
    from he2st.evaluate.splits import Fold

    ids = cohort.slide_ids
    fold = Fold("ood", (ids[0],), (ids[1],), (ids[2],), val_mode=mode)
    out = run_fold("knn", {"encoder": "color_stats", "weights": None, "patch_px": 32}, cohort, fold, genes="all", min_spots=1)
    assert set(out.metrics["test_slide"]) == {ids[2]}
    if mode == "score":
        # Kept from the method (not in the bank), scored as an in-distribution test.
        assert out.model.get_extra()["bank_slides"] == [ids[0]]
        assert set(out.validation_metrics["test_slide"]) == {ids[1]} and len(out.validation_predictions) == 1
        assert set(out.validation_per_gene["test_slide"]) == {ids[1]}
    else:
        assert out.model.get_extra()["bank_slides"] == [ids[0], ids[1]]
        assert out.validation_metrics is None and out.validation_predictions == []
    # The protocol's option overrides the fold's.
    other = "select" if mode == "score" else "score"
    flipped = run_fold("knn", {"encoder": "color_stats", "weights": None, "patch_px": 32}, cohort, fold, genes="all", min_spots=1,
                       validation=other)
    assert (flipped.validation_metrics is None) == (other == "select")


def test_results_made_under_other_defaults_are_not_resumed(tmp_path, syn_root, monkeypatch) -> None:
    """A default that changed since a result was stored (e.g. a faithful-port fix) is caught on resume."""
    from he2st.methods import get_method_class

    cfg = _config(tmp_path / "run", syn_root, methods=["knn"])
    run_benchmark(cfg)
    knn = get_method_class("knn")
    monkeypatch.setattr(knn, "defaults", {**knn.defaults, "metric": "euclidean", "new_knob": 1})
    with pytest.raises(RunConfigError, match=r"defaults were different.*\['metric'\]"):
        run_benchmark(cfg)
    monkeypatch.undo()
    assert run_benchmark(cfg).folds_skipped > 0


def test_opt_in_metrics_flow_from_the_config(tmp_path, syn_root) -> None:
    res = run_benchmark(_config(tmp_path / "run", syn_root, methods=["ridge"], metrics=["default", "ssim", "svg"], report=False))
    m = res.metrics
    assert {"spearman", "nrmse", "auc", "jsd", "ssim", "svg_recovery"} <= set(m["metric"])
    assert "mi" not in set(m["metric"]) and "SVG" in set(m["gene_set"])
    assert "ssim" in res.per_gene.columns
    with pytest.raises(RunConfigError, match="metrics"):
        BenchmarkConfig.from_dict({"metrics": ["nope"]})


def test_default_gene_panel(her2st_root) -> None:
    from he2st.benchmark.config import default_genes
    from he2st.datasets import her2st_panel

    assert BenchmarkConfig.from_dict({}).genes == "hvg:1000"
    path = default_genes("her2st", {"root": str(her2st_root)})
    assert path.endswith("her_hvg_cut_1000.npy")
    assert len(her2st_panel(her2st_root)) == 785


def test_nested_grid_over_context_and_per_gene_penalty(tmp_path, syn_root) -> None:
    """Context and the per-gene penalty are ordinary grid values: None, tables and booleans, chosen on inner folds."""
    ctx = {"fov": [1, 3], "neighbours": 6}
    grid = {"ridge": {"context": [None, ctx], "alpha_per_gene": [False, True]}}
    fast = {"ridge": {"patch_px": 32, "feature_scaling": "standard", "alphas": [1.0, 100.0]}}  # CI time
    run_benchmark(_config(tmp_path / "nested", syn_root, methods=["ridge"], split="nested", grid=grid, method_params=fast))
    for fold in ("syn0", "syn1", "syn2"):
        rec = json.loads((tmp_path / "nested" / "folds" / "ridge" / f"{fold}.json").read_text())
        sel = rec["selection"]
        assert [(c["params"]["context"], c["params"]["alpha_per_gene"]) for c in sel["candidates"]] == [
            (None, False), (None, True), (ctx, False), (ctx, True)]
        assert all(fold not in name.split("-inner-")[1] for name in sel["inner_folds"])
        best = max(sel["candidates"], key=lambda c: c["inner_pcc_acg"])
        assert sel["best"] == best["params"]
        assert rec["params"]["context"] == best["params"]["context"]
        assert rec["params"]["alpha_per_gene"] == best["params"]["alpha_per_gene"]
        assert ("gene_alphas" in rec["extra"]) == best["params"]["alpha_per_gene"]
