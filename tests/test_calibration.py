"""Calibration tables and plots (he2st.analysis.calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from he2st.analysis.calibration import TABLE_COLUMNS, calibration_summary, calibration_table, plot_calibration
from he2st.errors import He2stInputError


def test_table_hand_values() -> None:
    # 2 spots x 3 genes; errors (obs - pred) and sds chosen by hand.
    pred = np.zeros((2, 3))
    obs = np.array([[1.0, -1.0, 3.0], [2.0, -2.0, 0.5]])
    sd = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    tab = calibration_table(obs, pred, sd, n_bins=2)
    assert list(tab.columns) == list(TABLE_COLUMNS)
    assert tab["n"].tolist() == [3, 3]
    # Bin 0 (sd = 1): errors 1, -1, 3 -> rmse sqrt(11/3), mae 5/3, coverage: |3| > 1.96 -> 2/3.
    r0 = tab.iloc[0]
    assert r0["mean_sd"] == pytest.approx(1.0)
    assert r0["rmse"] == pytest.approx(math.sqrt(11 / 3))
    assert r0["mae"] == pytest.approx(5 / 3)
    assert r0["expected_mae"] == pytest.approx(math.sqrt(2 / math.pi))
    assert r0["coverage95"] == pytest.approx(2 / 3)
    # Bin 1 (sd = 2): errors 2, -2, 0.5 -> rmse sqrt(8.25/3), all inside 1.96*2.
    r1 = tab.iloc[1]
    assert (r1["sd_min"], r1["sd_max"]) == (2.0, 2.0)
    assert r1["rmse"] == pytest.approx(math.sqrt(8.25 / 3))
    assert r1["coverage95"] == 1.0


def test_summary_perfect_ranking_and_ence() -> None:
    sd = np.array([[1.0, 2.0, 3.0, 4.0]])
    obs = sd.copy()  # |error| == sd exactly
    s = calibration_summary(obs, np.zeros_like(obs), sd, n_bins=4)
    assert s["spearman"] == pytest.approx(1.0)
    assert s["ence"] == pytest.approx(0.0)
    assert s["coverage95"] == 1.0
    assert s["n"] == 4
    assert s["rmse"] == pytest.approx(math.sqrt((1 + 4 + 9 + 16) / 4))


def test_gaussian_errors_are_calibrated() -> None:
    rng = np.random.default_rng(0)
    sd = rng.uniform(0.2, 3.0, size=(4000, 5))
    obs = rng.normal(0.0, sd)
    tab = calibration_table(obs, np.zeros_like(obs), sd, n_bins=5)
    np.testing.assert_allclose(tab["rmse"], tab["mean_sd"], rtol=0.08)
    np.testing.assert_allclose(tab["coverage95"], 0.95, atol=0.02)
    # Errors that ignore the stated sd are not: rank correlation near 0.
    s = calibration_summary(rng.normal(size=sd.shape), np.zeros_like(sd), sd)
    assert abs(s["spearman"]) < 0.05


def test_nan_pairs_dropped_and_bad_input() -> None:
    obs = np.array([[1.0, np.nan], [2.0, 3.0]])
    tab = calibration_table(obs, np.zeros((2, 2)), np.ones((2, 2)), n_bins=10)
    assert tab["n"].sum() == 3  # at most one bin per pair
    with pytest.raises(He2stInputError, match="same shape"):
        calibration_table(np.zeros((2, 2)), np.zeros((2, 3)), np.ones((2, 2)))
    with pytest.raises(He2stInputError, match="non-negative"):
        calibration_table(np.zeros((1, 2)), np.zeros((1, 2)), -np.ones((1, 2)))


def test_plot(tmp_path) -> None:
    rng = np.random.default_rng(1)
    sd = rng.uniform(0.1, 1, size=(50, 4))
    tab = calibration_table(rng.normal(0, sd), np.zeros_like(sd), sd, n_bins=5)
    fig = plot_calibration({"stimage": tab, "ensemble": tab.assign(rmse=tab["rmse"] * 1.5)})
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two methods + diagonal
    np.testing.assert_allclose(ax.lines[0].get_xdata(), tab["mean_sd"])
    fig.savefig(tmp_path / "cal.png")
    assert (tmp_path / "cal.png").stat().st_size > 0


def test_report_section_from_a_run(tmp_path) -> None:
    """A tiny benchmark with an uncertainty method: the report gains the calibration plot and table."""
    import torch

    from he2st.analysis.calibration import calibration_section, run_calibration
    from he2st.analysis.report import read_run, write_report
    from he2st.benchmark.run import run_benchmark

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {
            "out": str(tmp_path / "run"),
            "data": "synthetic",
            "data_params": {"n_slides": 3, "n_spots": 60, "n_genes": 12},
            "methods": [
                "mean",
                {"name": "stimage", "label": "stimage", "params": {
                    "encoder": "color_stats", "weights": None, "stain": None, "n_models": 2, "epochs": 3, "lr": 3e-2,
                }},
            ],
            "genes": "all",
            "n_top": 5,
            "quiet": True,
            "report": False,
        }
        run_benchmark(cfg)
    finally:
        torch.set_num_threads(n)
    run = read_run(tmp_path / "run")
    tables, summary = run_calibration(run, n_bins=5)
    assert list(tables) == ["stimage"] and list(summary.index) == ["stimage"]  # 'mean' states no uncertainty
    assert tables["stimage"]["n"].sum() == summary.loc["stimage", "n"] == 3 * 60 * 12
    html = calibration_section(run, n_bins=5)
    assert "<img" in html and "coverage95" in html
    page = write_report(tmp_path / "run").read_text()
    assert 'id="calibration"' in page
