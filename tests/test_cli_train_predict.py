"""``he2st train`` and ``he2st predict`` end to end on a small synthetic cohort, and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import he2st
from he2st.cli import app

runner = CliRunner()

SYN = {"n_slides": 3, "n_spots": 60, "n_genes": 10, "patch_px": 32, "seed": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained by the CLI (config file + options) and an unsequenced fourth slide as .h5ad."""
    import os

    from he2st.datasets import synthetic
    from he2st.inference import image_only

    folder = tmp_path_factory.mktemp("cli")
    old = os.environ.get("HE2ST_CACHE")
    os.environ["HE2ST_CACHE"] = str(folder / "cache")  # one cache for the module (features, synthetic images)
    try:
        config = folder / "run.toml"
        config.write_text(
            'data = "synthetic"\n'
            f"data_params = {{ n_slides = {SYN['n_slides']}, n_spots = {SYN['n_spots']}, n_genes = {SYN['n_genes']} }}\n"
            'encoder = "color_stats"\n'
            'genes = "all"\n'
            '[[methods]]\nname = "ridge"\nparams = { n_components = 8 }\n'
        )
        model_dir = folder / "model"
        result = runner.invoke(
            app, ["train", "--config", str(config), "--method", "ridge", "--params", "cv_metric=pcc", "--cv", "--out", str(model_dir)]
        )
        assert result.exit_code == 0, result.output
        # The fourth slide of the same generator: never seen in training, saved without its counts.
        fourth = synthetic(**{**SYN, "n_slides": 4})[3]
        h5ad = folder / "syn3_unsequenced.h5ad"
        image_only(fourth).write_h5ad(h5ad)
        yield {"dir": folder, "model": model_dir, "output": result.output, "fourth": fourth, "h5ad": h5ad}
    finally:
        if old is None:
            os.environ.pop("HE2ST_CACHE", None)
        else:
            os.environ["HE2ST_CACHE"] = old


def test_train_writes_a_model_folder_with_card(trained):
    assert "trained ridge on 3 slides" in trained["output"] and "leave-one-slide-out" in trained["output"]
    card = json.loads((trained["model"] / "card.json").read_text())
    assert card["method"] == "ridge" and card["n_genes"] == SYN["n_genes"]
    assert card["model"]["params"]["n_components"] == 8 and card["model"]["params"]["cv_metric"] == "pcc"
    assert card["model"]["params"]["patch_px"] == 32  # the synthetic cohort's pitch, resolved as the benchmark does
    assert [s["slide_id"] for s in card["training"]["slides"]] == ["syn0", "syn1", "syn2"]
    cv = card["cv_metrics"]
    assert cv["split"] == "loso" and cv["n_folds"] == 3 and np.isfinite(cv["summary"]["PCC(ACG)"]["mean"])
    assert card["options"]["genes"] == "all" and card["options"]["data_params"]["n_slides"] == 3


def test_predict_h5ad_writes_anndata_table_and_maps(trained, tmp_path):
    import anndata as ad

    from he2st.inference import load_model

    out = tmp_path / "pred.h5ad"
    genes = ["GENE001", "GENE004"]
    result = runner.invoke(
        app, ["predict", str(trained["model"]), str(trained["h5ad"]), "--out", str(out), "--maps", ",".join(genes), "--csv"]
    )
    assert result.exit_code == 0, result.output
    a = ad.read_h5ad(out)
    model, _ = load_model(trained["model"])
    np.testing.assert_allclose(a.X, model.predict(trained["fourth"]), rtol=1e-6)
    assert list(a.var_names) == list(model.genes) and "hires" in a.uns["spatial"]["syn3"]["images"]
    table = pd.read_csv(tmp_path / "pred.csv")
    assert list(table.columns[:4]) == ["spot_id", "slide", "x", "y"] and len(table) == a.n_obs
    np.testing.assert_allclose(table[list(a.var_names)].to_numpy(), a.X, rtol=1e-5)
    for g in genes:
        assert (tmp_path / f"pred_{g}.png").stat().st_size > 1000
    # Parquet, for people outside Python, from the sequenced slide too (its counts are ignored).
    seq = tmp_path / "seq.h5ad"
    trained["fourth"].write_h5ad(seq)
    result = runner.invoke(app, ["predict", str(trained["model"]), str(seq), "--out", str(tmp_path / "p2.h5ad"), "--parquet"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "p2.parquet")[list(a.var_names)].to_numpy(), a.X, rtol=1e-6)


def test_predict_image_input(trained, tmp_path):
    fourth = trained["fourth"]
    m = he2st.data.meta(fourth)
    spots = tmp_path / "spots.csv"
    xy = fourth.obsm["spatial"]
    pd.DataFrame({"barcode": fourth.obs_names, "x": xy[:, 0], "y": xy[:, 1]}).to_csv(spots, index=False)
    out = tmp_path / "img.h5ad"
    result = runner.invoke(
        app, ["predict", str(trained["model"]), m.image_path, "--spots", str(spots), "--mpp", str(m.mpp), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    import anndata as ad

    from he2st.inference import load_model

    model, _ = load_model(trained["model"])
    np.testing.assert_allclose(ad.read_h5ad(out).X, model.predict(fourth), rtol=1e-5, atol=1e-6)


def test_predict_image_on_a_grid_and_without_mpp(trained, tmp_path):
    fourth = trained["fourth"]
    m = he2st.data.meta(fourth)
    out = tmp_path / "grid.h5ad"
    result = runner.invoke(
        app, ["predict", str(trained["model"]), m.image_path, "--grid-um", "100", "--mpp", str(m.mpp), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    import anndata as ad

    pred = ad.read_h5ad(out)
    assert pred.n_obs > 0.5 * fourth.n_obs and np.isfinite(pred.X).all()
    # Without --spots or --grid-um: a grid like the training spots (the card records their layout).
    card = json.loads((trained["model"] / "card.json").read_text())
    layout = card["training"]["spots"]
    assert layout["pitch_um"] == pytest.approx(100.0, rel=0.02) and layout["kind"] in ("hex", "square")
    assert layout["spot_diameter_um"] == pytest.approx(m.spot_diameter_px * m.mpp)
    default = tmp_path / "default.h5ad"
    result = runner.invoke(app, ["predict", str(trained["model"]), m.image_path, "--mpp", str(m.mpp), "--out", str(default)])
    assert result.exit_code == 0, result.output
    got = ad.read_h5ad(default)
    assert got.n_obs > 0.5 * fourth.n_obs
    d = np.sort(np.linalg.norm(got.obsm["spatial"][1:] - got.obsm["spatial"][:-1], axis=1))[0]
    assert d * m.mpp == pytest.approx(100.0, rel=0.05)  # neighbouring grid spots one training pitch apart
    # A PNG has no pixel size: the reader refuses and says how to pass it; nothing is written.
    bad = tmp_path / "nompp.h5ad"
    result = runner.invoke(app, ["predict", str(trained["model"]), m.image_path, "--grid-um", "100", "--out", str(bad)])
    assert result.exit_code == 2 and "mpp" in result.output and not bad.exists()


def _copy_model(trained, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(trained["model"], dst)
    return dst


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_predict_refuses_a_model_from_another_version(trained, tmp_path):
    model = _copy_model(trained, tmp_path)
    card = json.loads((model / "card.json").read_text())
    card["he2st_version"] = "9.1.0"
    (model / "card.json").write_text(json.dumps(card))
    out = tmp_path / "pred.h5ad"
    line = _one_line_error(runner.invoke(app, ["predict", str(model), str(trained["h5ad"]), "--out", str(out)]))
    assert "he2st 9.1.0" in line and he2st.__version__ in line
    assert not out.exists()


def test_predict_refuses_a_tampered_model(trained, tmp_path):
    model = _copy_model(trained, tmp_path)
    cfg = json.loads((model / "method.json").read_text())
    cfg["params"]["n_components"] = 4
    (model / "method.json").write_text(json.dumps(cfg))
    out = tmp_path / "pred.h5ad"
    line = _one_line_error(runner.invoke(app, ["predict", str(model), str(trained["h5ad"]), "--out", str(out)]))
    assert "method.json" in line and "does not match" in line
    assert not out.exists()


def test_predict_refuses_unknown_map_genes_and_writes_nothing(trained, tmp_path):
    out = tmp_path / "pred.h5ad"
    line = _one_line_error(
        runner.invoke(app, ["predict", str(trained["model"]), str(trained["h5ad"]), "--out", str(out), "--maps", "GENE001,ERBB2", "--csv"])
    )
    assert "ERBB2" in line and "GENE000" in line
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_one_line_errors(trained, tmp_path):
    model, h5ad = str(trained["model"]), str(trained["h5ad"])
    line = _one_line_error(runner.invoke(app, ["predict", model, h5ad, "--out", str(tmp_path / "p.txt")]))
    assert ".h5ad" in line
    line = _one_line_error(runner.invoke(app, ["predict", model, h5ad, "--out", str(tmp_path / "p.h5ad"), "--grid-um", "100"]))
    assert "--grid-um" in line
    line = _one_line_error(runner.invoke(app, ["predict", str(tmp_path / "nope"), h5ad, "--out", str(tmp_path / "p.h5ad")]))
    assert "nope" in line
    line = _one_line_error(runner.invoke(app, ["train", "--method", "ridge", "--params", "bogus=1", "--out", str(tmp_path / "m")]))
    assert "bogus" in line
    line = _one_line_error(runner.invoke(app, ["train", "--method", "ridge", "--genes", "hvg:x", "--out", str(tmp_path / "m")]))
    assert "hvg" in line
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    line = _one_line_error(runner.invoke(app, ["train", "--method", "ridge", "--out", str(tmp_path / "busy")]))
    assert "holds no he2st model" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_parse_params():
    from he2st.benchmark.train import parse_params
    from he2st.errors import He2stInputError

    got = parse_params(['{"epochs": 5, "lr": 0.1}', "encoder=color_stats", "tta=true", "alphas=[1, 10]", "lr=0.5"])
    assert got == {"epochs": 5, "lr": 0.5, "encoder": "color_stats", "tta": True, "alphas": [1, 10]}
    with pytest.raises(He2stInputError, match="key=value"):
        parse_params(["novalue"])
