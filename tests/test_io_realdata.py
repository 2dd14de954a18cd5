"""Readers and dataset builders on the real files in ../shared/data (skipped when absent)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import he2st
from he2st.data import meta, require_counts
from he2st.errors import He2stInputError, NotCountsError
from he2st.image import image_size
from he2st.datasets import read_any, summarize
from he2st.io import MissingFileError

pytestmark = pytest.mark.realdata

C_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
C_GENES = {"C2": 15706, "C3": 15821, "C4": 15842, "C5": 15721, "C6": 15772}


@pytest.fixture(scope="module")
def her2st_c(her2st_root):
    return he2st.datasets.her2st(her2st_root)


def test_her2st_imaged_sections(her2st_c, her2st_root):
    c = her2st_c
    assert c.name == "her2st" and c.slide_ids == list(C_SPOTS)
    assert {s: c[s].n_obs for s in c.slide_ids} == C_SPOTS
    assert {s: c[s].n_vars for s in c.slide_ids} == C_GENES
    assert c.patient_ids == ["C"]
    # The derived index next to the data was computed independently (overlay fit).
    index = pd.read_csv(her2st_root / "image_index.tsv", sep="\t", index_col="section")
    for sid in c.slide_ids:
        s, m = c[sid], meta(c[sid])
        assert s.n_obs == index.loc[sid, "n_spots_in_counts"]
        w, h = image_size(m.image_path)
        assert (w, h) == (index.loc[sid, "width_px"], index.loc[sid, "height_px"])
        xy = s.obsm["spatial"]
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
        assert m.spot_diameter_px == pytest.approx(index.loc[sid, "spot_diameter_px"], abs=0.1)
        assert m.mpp == pytest.approx(200.0 / index.loc[sid, "spot_pitch_px"], rel=1e-3)
        assert m.scale == 1.0 and m.counts and "label" not in s.obs
        data = s.X.data
        assert (data > 0).all() and np.array_equal(data, np.round(data))
    # C3 has two spot-file entries without counts; the source says so.
    assert "2 spot entries without counts dropped" in meta(c["C3"]).source


def test_her2st_labels_b1_g2(her2st_root):
    with pytest.warns(UserWarning, match=r"slide 'G2': 8 rows of label file .*G2_labeled_coordinates\.tsv"):
        c = he2st.datasets.her2st(her2st_root, sections=["B1", "G2"], with_images_only=False)
    b1, g2 = c["B1"], c["G2"]
    assert c.patients == {"B1": "B", "G2": "G"}
    assert b1.n_obs == 295 and b1.obs["label"].notna().all()
    assert b1.obs["label"].value_counts().to_dict() == {
        "connective tissue": 95, "adipose tissue": 70, "invasive cancer": 63, "breast glands": 41, "undetermined": 26,
    }
    assert g2.n_obs == 467 and g2.obs["label"].notna().all()
    assert g2.obs["label"].value_counts()["invasive cancer"] == 140
    assert "8 label rows with NaN x/y dropped" in meta(g2).source
    # Count-only sections: no image, geometry from the spot grid (ST: 100 µm spots, 200 µm pitch).
    assert meta(b1).image_path is None and meta(b1).spot_diameter_px == pytest.approx(145.2, abs=0.1)


def test_her2st_panel(her2st_root, her2st_c):
    panel = he2st.datasets.her2st_panel(her2st_root)
    assert len(panel) == 785 == len(set(panel)) and panel[:3] == ["HPS6", "TNC", "NR1H2"]
    assert all(g in her2st_c["C2"].var_names for g in panel)


def test_her2st_bad_requests(her2st_root, tmp_path, monkeypatch):
    with pytest.raises(He2stInputError, match=r"no sections \['A1'\]"):  # withheld for evaluation
        he2st.datasets.her2st(her2st_root, sections=["A1"])
    with pytest.raises(He2stInputError, match=r"sections \['B1'\] have no H&E image"):
        he2st.datasets.her2st(her2st_root, sections=["B1"])
    with pytest.raises(MissingFileError, match=r"data set 'her2st' not found: no 'ST-cnts' in .*nowhere"):
        he2st.datasets.her2st(tmp_path / "nowhere")
    monkeypatch.setenv("HE2ST_HER2ST_ROOT", str(her2st_root))
    monkeypatch.chdir(tmp_path)
    assert he2st.datasets.her2st(sections=["C6"]).slide_ids == ["C6"]


def test_visium_mouse_brain_crop(squidpy_root):
    s = he2st.datasets.visium_mouse_brain_crop(squidpy_root)
    m = meta(s)
    assert s.n_obs == 49 and s.n_vars == 1999
    assert m.counts is False and m.slide_id == "V1_Adult_Mouse_Brain"
    assert m.spot_diameter_px == pytest.approx(89.44476, abs=1e-4)
    assert m.mpp == pytest.approx(55 / 89.44476, rel=1e-6) and m.scale == 1.0
    assert m.image_path.endswith("test_img.jpg")
    w, h = image_size(m.image_path)
    assert (w, h) == (950, 1717)
    xy = s.obsm["spatial"]
    assert xy.min() >= 0 and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    assert list(s.var["gene_ids"][:1]) == ["ENSMUSG00000090031"]
    with pytest.raises(NotCountsError, match="V1_Adult_Mouse_Brain"):
        require_counts(s, "highly-variable gene selection")
    assert "pre-normalised values (not counts)" in summarize(s)


def test_read_any_on_squidpy_h5ad(squidpy_root):
    with pytest.warns(UserWarning, match="not raw counts"):
        s = read_any(squidpy_root / "test_data.h5ad")
    assert s.n_obs == 49 and meta(s).counts is False and meta(s).image_path is None


@pytest.mark.slow
def test_her2st_all_sections_via_read_any(her2st_root):
    with pytest.warns(UserWarning, match="G2"):
        c = read_any(her2st_root)
    assert len(c) == 34 and c.patient_ids == list("ABCDEFGH")
    assert sum(meta(s).image_path is not None for s in c) == 5
    assert sum("label" in s.obs for s in c) == 7  # J1's labels have no counts
    assert c["F3"].n_obs == 712 and c["C1"].n_obs == 176
