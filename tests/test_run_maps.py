"""Maps of a benchmark run's predictions (he2st benchmark --maps)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from he2st.benchmark.demo import demo_config
from he2st.benchmark.maps import write_run_maps
from he2st.benchmark.run import run_benchmark
from he2st.cli import app
from he2st.errors import GenePanelError, He2stInputError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "run"
    run_benchmark(demo_config(out, methods=["mean", "ridge"], quiet=True))
    return out


def test_maps_of_every_method_and_test_slide(run_dir) -> None:
    written = write_run_maps(run_dir, "GENE001,GENE007")
    names = sorted(p.relative_to(run_dir / "maps").as_posix() for p in written)
    slides = [f"syn{i}" for i in range(4)]
    expected = sorted(f"{d}/{s}_{g}.png" for d in ("mean", "ridge", "observed") for s in slides for g in ("GENE001", "GENE007"))
    assert names == expected
    with Image.open(run_dir / "maps" / "ridge" / "syn2_GENE007.png") as im:
        assert np.asarray(im.convert("RGB")).std() > 10  # the H&E thumbnail and spots, not a blank canvas


def test_unknown_gene_or_method_draws_nothing(run_dir, tmp_path) -> None:
    import shutil

    clean = tmp_path / "run"
    shutil.copytree(run_dir, clean, ignore=shutil.ignore_patterns("maps"))
    with pytest.raises(GenePanelError, match="NOPE"):
        write_run_maps(clean, ["GENE001", "NOPE"])
    with pytest.raises(He2stInputError, match="no method"):
        write_run_maps(clean, "GENE001", methods=["stnet"])
    assert not (clean / "maps").exists()


def test_benchmark_cli_maps_option(run_dir) -> None:
    # The benchmark runs, then draws the maps of its predictions.
    result = CliRunner().invoke(app, ["benchmark", "--data", "synthetic", "--methods", "mean", "--genes", "all",
                                      "--encoder", "color_stats", "--out", str(run_dir / "cli"), "--maps", "GENE003", "-q"])
    assert result.exit_code == 0, result.output
    assert "maps: " in result.output and (run_dir / "cli" / "maps" / "mean" / "syn0_GENE003.png").is_file()
