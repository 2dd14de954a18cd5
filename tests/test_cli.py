"""The ``he2st`` command line (typer's CliRunner, plus one real subprocess for import cost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from he2st.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "info" in result.output and "demo" in result.output and "--quiet" in result.output


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys, he2st, he2st.cli\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(he2st.cli.app, ['--help'])\n"
        "assert r.exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'scanpy', 'anndata', 'matplotlib', 'sklearn', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_info_synthetic():
    result = runner.invoke(app, ["info", "synthetic"])
    assert result.exit_code == 0, result.output
    assert "cohort 'synthetic': 4 slides, 4 patients, 1200 spots" in result.output
    assert "syn3" in result.output and "P3" in result.output


def test_info_bad_path_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "error:" in result.output and "nope" in result.output


def test_quiet_sets_env(monkeypatch):
    monkeypatch.delenv("HE2ST_QUIET", raising=False)
    result = runner.invoke(app, ["--quiet", "info", "synthetic"])
    assert result.exit_code == 0, result.output
    assert os.environ.get("HE2ST_QUIET") == "1"


def test_run_demo_writes_figures_and_summary(tmp_path):
    from PIL import Image

    from he2st.benchmark.demo import format_demo, run_demo

    out = tmp_path / "demo"
    summary = run_demo(out)
    assert json.loads((out / "summary.json").read_text())["slides"] == summary["slides"]
    assert summary["n_slides"] == 4 and summary["n_spots"] == 1200 and summary["patch_px"] == 32
    for s in summary["slides"]:
        assert s["patches_shape"] == [300, 32, 32, 3]
        assert 0.3 < s["mean_tissue_fraction"] <= 1.0
        assert sum(s["labels"].values()) == 300
        with Image.open(s["figure"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        assert rgb.shape[0] > 200 and rgb.std() > 10  # a real picture, not a blank canvas
    assert "syn0 (P0): 300 spots" in format_demo(summary)


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "syn3 (P3): 300 spots" in result.output
    assert (out / "summary.json").is_file() and (out / "spots_syn0.png").is_file()
    # It ends by predicting the last slide from its image alone, with maps next to the report.
    assert "predicts syn3 from its image alone" in result.output
    assert (out / "prediction" / "syn3.h5ad").is_file() and len(list((out / "prediction").glob("syn3_*.png"))) == 3


def test_plot_spots_colour_modes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from he2st.analysis.plots import plot_spots
    from he2st.datasets import synthetic
    from he2st.errors import He2stInputError

    slide = synthetic(n_slides=1, n_spots=40, n_genes=5, patch_px=16, root=tmp_path)[0]
    fig, axes = plt.subplots(1, 3)
    plot_spots(slide, ax=axes[0])
    plot_spots(slide, ax=axes[1], color="GENE001")
    plot_spots(slide, ax=axes[2], color=np.arange(slide.n_obs))
    # One spot disc per spot, drawn in image pixel coordinates at the spot diameter.
    discs = axes[1].collections[0]
    assert len(discs.get_offsets()) == 40
    assert axes[1].get_title() == "syn0: GENE001 (log1p CPM)"
    assert axes[0].get_xlim()[1] > slide.obsm["spatial"][:, 0].max()
    plt.close(fig)
    with pytest.raises(He2stInputError, match="neither an obs column"):
        plot_spots(slide, color="NOPE")
    plt.close("all")
