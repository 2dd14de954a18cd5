"""Readers on small generated files: ST legacy, Space Ranger outs, HEST, h5ad, read_any, summarize."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from he2st.data import meta, require_counts
from he2st.errors import He2stInputError, ImageError, NotCountsError, SlideError
from he2st.datasets import read_any, summarize
from he2st.io import (
    MissingFileError,
    read_h5ad,
    read_hest,
    read_st_legacy,
    read_visium,
)


def _image(path: Path, w: int, h: int) -> Path:
    from PIL import Image

    Image.new("RGB", (w, h), (230, 200, 220)).save(path)
    return path


# ---------------------------------------------------------------------------
# ST legacy (her2st layout)
# ---------------------------------------------------------------------------

# A 3 x 3 grid, pitch 100 px: pixel = (new - 1) * 100 + 50, so spot diameter 50 px
# (pitch / 2) and 2 µm/px (200 µm / 100 px).
GRID = [(x, y) for y in (1, 2, 3) for x in (1, 2, 3)]


def _write_st(tmp: Path, counts: pd.DataFrame | None = None, spots: pd.DataFrame | None = None, name="S1"):
    if counts is None:
        ids = [f"{x}x{y}" for x, y in GRID]
        counts = pd.DataFrame(np.arange(len(ids) * 3).reshape(-1, 3), index=ids, columns=["GA", "GB", "GC"])
    if spots is None:
        spots = pd.DataFrame(
            {
                "x": [x for x, _ in GRID],
                "y": [y for _, y in GRID],
                "new_x": [x + 0.0 for x, _ in GRID],
                "new_y": [y + 0.0 for _, y in GRID],
                "pixel_x": [(x - 1) * 100 + 50.0 for x, _ in GRID],
                "pixel_y": [(y - 1) * 100 + 50.0 for _, y in GRID],
                "selected": 1,
            }
        )
    cpath = tmp / f"{name}.tsv.gz"
    with gzip.open(cpath, "wt") as fh:
        counts.to_csv(fh, sep="\t")
    spath = tmp / f"{name}_selection.tsv"
    spots.to_csv(spath, sep="\t", index=False)
    return cpath, spath


def test_st_legacy_reads_grid_and_fits_pitch(tmp_path):
    c, s = _write_st(tmp_path)
    img = _image(tmp_path / "he.jpg", 300, 300)
    slide = read_st_legacy(c, s, image=img, patient="P")
    m = meta(slide)
    assert m.slide_id == "S1" and m.patient == "P" and m.scale == 1.0 and m.counts
    assert m.spot_diameter_px == pytest.approx(50.0) and m.mpp == pytest.approx(2.0)
    assert m.image_path == str(img.resolve())
    assert list(slide.obs_names[:3]) == ["1x1", "2x1", "3x1"]
    np.testing.assert_array_equal(slide.X.toarray()[1], [3, 4, 5])
    np.testing.assert_allclose(slide.obsm["spatial"][1], [150.0, 50.0])
    assert list(slide.obs["array_col"][:3]) == [1, 2, 3] and list(slide.obs["array_row"][:3]) == [1, 1, 1]
    assert "9 spots kept" in m.source


def test_st_legacy_drops_unmatched_rows_and_reports(tmp_path, caplog):
    ids = [f"{x}x{y}" for x, y in GRID][:7] + ["9x9"]  # 2 grid spots without counts, 1 counts row without spot
    counts = pd.DataFrame(np.ones((8, 2), dtype=int), index=ids, columns=["GA", "GB"])
    c, s = _write_st(tmp_path, counts=counts)
    with caplog.at_level("INFO", logger="he2st.io"):
        slide = read_st_legacy(c, s)
    assert slide.n_obs == 7 and "9x9" not in slide.obs_names
    src = meta(slide).source
    assert "1 counts rows without a spot entry dropped" in src and "2 spot entries without counts dropped" in src
    assert "1 counts rows without a spot entry dropped" in caplog.text


def test_st_legacy_labels_join_on_rounded_coordinates(tmp_path):
    c, s = _write_st(tmp_path)
    lab = pd.DataFrame(
        {
            "x": [0.9, 2.1, np.nan, 3.04, 7.0],
            "y": [1.1, 0.95, 2.0, 3.2, 7.0],
            "label": ["tumour", "stroma", "lost", "tumour", "nowhere"],
        }
    )
    lpath = tmp_path / "S1_labeled_coordinates.tsv"
    lab.to_csv(lpath, sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"slide 'S1': 1 rows of label file .*NaN"):
        slide = read_st_legacy(c, s, labels=lpath)
    got = slide.obs["label"]
    assert got["1x1"] == "tumour" and got["2x1"] == "stroma" and got["3x3"] == "tumour"
    assert got.isna().sum() == 6
    assert "3/9 spots labelled, 1 label rows match no kept spot" in meta(slide).source


def test_st_legacy_conflicting_labels(tmp_path):
    c, s = _write_st(tmp_path)
    lpath = tmp_path / "lab.tsv"
    pd.DataFrame({"x": [1.0, 1.2], "y": [1.0, 0.9], "label": ["a", "b"]}).to_csv(lpath, sep="\t", index=False)
    with pytest.raises(SlideError, match=r"lab\.tsv.*'1x1' two labels"):
        read_st_legacy(c, s, labels=lpath)


def test_st_legacy_missing_file(tmp_path):
    c, s = _write_st(tmp_path)
    with pytest.raises(MissingFileError, match=r"ST spot file .*nope_selection\.tsv' does not exist"):
        read_st_legacy(c, tmp_path / "nope_selection.tsv")
    with pytest.raises(MissingFileError, match="ST counts file"):
        read_st_legacy(tmp_path / "nope.tsv.gz", s)


def test_st_legacy_no_common_spot(tmp_path):
    counts = pd.DataFrame([[1, 2]], index=["20x20"], columns=["GA", "GB"])
    c, s = _write_st(tmp_path, counts=counts)
    msg = r"slide 'S1': no spot id is shared by counts .*S1\.tsv\.gz.*S1_selection\.tsv"
    with pytest.raises(SlideError, match=msg):
        read_st_legacy(c, s)


def test_st_legacy_spots_outside_image(tmp_path):
    c, s = _write_st(tmp_path)
    img = _image(tmp_path / "small.png", 200, 300)  # the x = 250 column falls outside
    with pytest.raises(SlideError, match=r"slide 'S1': 3 spot centres lie outside the 200x300 image"):
        read_st_legacy(c, s, image=img)


def test_st_legacy_duplicated_spot_ids(tmp_path):
    counts = pd.DataFrame([[1, 2], [3, 4]], index=["1x1", "1x1"], columns=["GA", "GB"])
    c, s = _write_st(tmp_path, counts=counts)
    with pytest.raises(SlideError, match=r"S1\.tsv\.gz' has duplicated spot ids: \['1x1'\]"):
        read_st_legacy(c, s)
    spots = pd.DataFrame({"x": [1, 1, 2], "y": [1, 1, 2], "pixel_x": [1.0, 2, 3], "pixel_y": [1.0, 2, 3]})
    c, s = _write_st(tmp_path, spots=spots, name="S2")
    with pytest.raises(SlideError, match=r"S2_selection\.tsv' has duplicated spot ids"):
        read_st_legacy(c, s, spot_diameter_px=5)


def test_st_legacy_non_numeric_counts(tmp_path):
    ids = [f"{x}x{y}" for x, y in GRID]
    counts = pd.DataFrame({"GA": range(9), "GB": ["1"] * 8 + ["lots"]}, index=ids)
    c, s = _write_st(tmp_path, counts=counts)
    msg = r"S1\.tsv\.gz' has non-numeric values .* 'GB' \(e\.g\. 'lots' in spot '3x3'\)"
    with pytest.raises(SlideError, match=msg):
        read_st_legacy(c, s)


def test_st_legacy_negative_counts(tmp_path):
    ids = [f"{x}x{y}" for x, y in GRID]
    counts = pd.DataFrame({"GA": range(9), "GB": [1] * 8 + [-2]}, index=ids)
    c, s = _write_st(tmp_path, counts=counts)
    with pytest.raises(SlideError, match=r"counts in .*S1\.tsv\.gz' contain negative values \(min -2\)"):
        read_st_legacy(c, s)


def test_st_legacy_nan_coordinates(tmp_path):
    c, s = _write_st(tmp_path)
    spots = pd.read_csv(s, sep="\t")
    spots.loc[[0, 4], "pixel_x"] = np.nan
    spots.to_csv(s, sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"slide 'S1': 2 rows of spot file .*NaN"):
        slide = read_st_legacy(c, s)
    assert slide.n_obs == 7 and "1x1" not in slide.obs_names
    assert "2 spot entries with NaN coordinates dropped" in meta(slide).source
    spots["pixel_x"] = np.nan
    spots.to_csv(s, sep="\t", index=False)
    with pytest.raises(SlideError, match=r"slide 'S1': spot file .* all 9 spot rows have missing \(NaN\)"):
        read_st_legacy(c, s)


def test_st_legacy_empty_slide(tmp_path):
    counts = pd.DataFrame(columns=["GA", "GB"])
    c, s = _write_st(tmp_path, counts=counts)
    with pytest.raises(SlideError, match=r"slide 'S1': counts file .*S1\.tsv\.gz' has no spots \(empty slide\)"):
        read_st_legacy(c, s)


def test_st_legacy_image_that_is_not_an_image(tmp_path):
    c, s = _write_st(tmp_path)
    fake = tmp_path / "he.jpg"
    fake.write_text("this is not a JPEG")
    with pytest.raises(ImageError, match=r"he\.jpg"):
        read_st_legacy(c, s, image=fake)


def test_st_legacy_duplicated_genes_not_renamed(tmp_path):
    ids = [f"{x}x{y}" for x, y in GRID]
    c, s = _write_st(tmp_path)
    with gzip.open(c, "wt") as fh:  # pandas would silently rename the second "GA" to "GA.1"
        fh.write("\tGA\tGA\n" + "".join(f"{i}\t1\t2\n" for i in ids))
    with pytest.raises(SlideError, match=r"duplicated gene columns: \['GA'\]"):
        read_st_legacy(c, s)


# ---------------------------------------------------------------------------
# Space Ranger outs
# ---------------------------------------------------------------------------

# Hexagonal Visium grid at 5 µm/px: one array_col step = 50 µm = 10 px, one
# array_row step = 86.6 µm = 10*sqrt(3) px; spot_diameter_fullres = 55 / 5 = 11 px.
ROW_PX = 10 * math.sqrt(3)
POS = pd.DataFrame(
    {
        "barcode": [f"B{i}-1" for i in range(8)],
        "in_tissue": [1, 1, 1, 1, 1, 1, 0, 0],
        "array_row": [0, 0, 1, 1, 2, 2, 3, 3],
        "array_col": [0, 2, 1, 3, 0, 2, 1, 3],
    }
)
POS["pxl_row_in_fullres"] = 40 + POS["array_row"] * ROW_PX
POS["pxl_col_in_fullres"] = 30 + POS["array_col"] * 10.0
MATRIX_BARCODES = ["B5-1", "B0-1", "B1-1", "B2-1", "B3-1", "B6-1"]  # B4 in tissue but no counts; B6 off tissue
FEATURES = pd.DataFrame(
    {
        "id": ["ENSG1", "ENSG2", "ENSG3", "AB1"],
        "name": ["G1", "G2", "G2", "CD3"],
        "type": ["Gene Expression"] * 3 + ["Antibody Capture"],
    }
)
COUNTS = np.arange(len(MATRIX_BARCODES) * 4).reshape(len(MATRIX_BARCODES), 4) % 5  # barcodes x features


def _write_outs(tmp: Path, positions: str, matrix: str, hires: bool = True) -> Path:
    outs = tmp / "run1" / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    if matrix == "h5":
        import h5py

        csr = sp.csr_matrix(COUNTS)  # barcodes x features CSR == features x barcodes CSC
        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
            g = f.create_group("matrix")
            g["data"], g["indices"], g["indptr"] = csr.data.astype(np.int32), csr.indices, csr.indptr
            g["shape"] = np.array([COUNTS.shape[1], COUNTS.shape[0]])
            g["barcodes"] = np.array(MATRIX_BARCODES, dtype="S")
            fg = g.create_group("features")
            fg["id"] = np.array(FEATURES["id"], dtype="S")
            fg["name"] = np.array(FEATURES["name"], dtype="S")
            fg["feature_type"] = np.array(FEATURES["type"], dtype="S")
    else:
        mdir = outs / "filtered_feature_bc_matrix"
        mdir.mkdir()
        with gzip.open(mdir / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sp.coo_matrix(COUNTS.T))
        pd.Series(MATRIX_BARCODES).to_csv(mdir / "barcodes.tsv.gz", sep="\t", header=False, index=False)
        FEATURES.to_csv(mdir / "features.tsv.gz", sep="\t", header=False, index=False)
    if positions == "csv":
        POS.to_csv(spatial / "tissue_positions.csv", index=False)
    elif positions == "list":
        POS.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    else:
        POS.to_parquet(spatial / "tissue_positions.parquet", index=False)
    sf = {"spot_diameter_fullres": 11.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1,
          "fiducial_diameter_fullres": 17.8}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    if hires:
        _image(spatial / "tissue_hires_image.png", 60, 55)
    return outs


@pytest.mark.parametrize("positions", ["csv", "list", "parquet"])
@pytest.mark.parametrize("matrix", ["h5", "mtx"])
def test_read_visium_hires_frame(tmp_path, positions, matrix):
    outs = _write_outs(tmp_path, positions, matrix)
    slide = read_visium(outs.parent)  # the run folder holding outs/ works too
    m = meta(slide)
    assert m.slide_id == "run1" and m.scale == 0.5 and m.counts
    assert list(slide.obs_names) == ["B5-1", "B0-1", "B1-1", "B2-1", "B3-1"]
    assert list(slide.var_names) == ["G1", "G2", "G2-1"] and list(slide.var["gene_ids"]) == ["ENSG1", "ENSG2", "ENSG3"]
    np.testing.assert_array_equal(slide.X.toarray(), COUNTS[:5, :3])
    # B5: array_row 2, array_col 2 -> full-res (50, 40 + 2*ROW_PX), halved for the hires image.
    np.testing.assert_allclose(slide.obsm["spatial"][0], [25.0, (40 + 2 * ROW_PX) / 2])
    assert m.spot_diameter_px == pytest.approx(5.5) and m.mpp == pytest.approx(10.0)
    assert m.image_path.endswith("tissue_hires_image.png")
    assert list(slide.obs["array_row"]) == [2, 0, 0, 1, 1]
    assert "1 matrix barcodes not under tissue dropped" in m.source
    assert "1 in-tissue positions without counts dropped" in m.source


def test_read_visium_fullres_image(tmp_path):
    outs = _write_outs(tmp_path, "csv", "h5")
    img = _image(tmp_path / "fullres.tif", 120, 110)
    slide = read_visium(outs, image=img, slide_id="V")
    m = meta(slide)
    assert m.scale == 1.0 and m.spot_diameter_px == pytest.approx(11.0) and m.mpp == pytest.approx(5.0)
    np.testing.assert_allclose(slide.obsm["spatial"][0], [50.0, 40 + 2 * ROW_PX])


def test_read_visium_missing_files(tmp_path):
    outs = _write_outs(tmp_path, "csv", "h5")
    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(MissingFileError, match=r"slide 'run1': no spot positions in .*spatial"):
        read_visium(outs)
    with pytest.raises(MissingFileError, match="Space Ranger outs folder"):
        read_visium(tmp_path / "absent")


def test_read_visium_negative_and_no_image_warns(tmp_path):
    outs = _write_outs(tmp_path, "csv", "mtx", hires=False)
    with pytest.warns(UserWarning, match="the slide has no image"):
        slide = read_visium(outs)
    assert meta(slide).image_path is None and meta(slide).scale == 1.0
    with gzip.open(outs / "filtered_feature_bc_matrix" / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(-COUNTS.T - 1))
    with pytest.raises(SlideError, match=r"slide 'run1': counts in .*filtered_feature_bc_matrix' contain negative"):
        read_visium(outs)


# ---------------------------------------------------------------------------
# HEST-1k and h5ad
# ---------------------------------------------------------------------------


def _anndata(n=6, X=None, spatial=None):
    import anndata as ad

    X = np.arange(n * 3).reshape(n, 3) % 4 if X is None else X
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)))
    a.obs_names = [f"s{i}" for i in range(n)]
    a.var_names = ["GA", "GB", "GC"]
    if spatial is None:
        spatial = np.column_stack([10 + 8 * np.arange(n), 20 + 4 * np.arange(n)]).astype(float)
    a.obsm["spatial"] = spatial
    return a


def _write_hest(tmp: Path, sid="TENX1") -> Path:
    import tifffile

    for d in ("st", "wsis", "metadata"):
        (tmp / d).mkdir(exist_ok=True)
    a = _anndata()
    a.obs["array_row"] = np.arange(6)
    a.obs["array_col"] = np.arange(6) * 2
    a.obs["in_tissue"] = [1, 1, 1, 1, 1, 0]
    # HEST ships a thumbnail library whose scale factors do not apply to the WSI.
    a.uns["spatial"] = {
        "ST": {"scalefactors": {"spot_diameter_fullres": 999.0, "tissue_downscaled_fullres_scalef": 0.1}}
    }
    a.write_h5ad(tmp / "st" / f"{sid}.h5ad")
    tifffile.imwrite(tmp / "wsis" / f"{sid}.tif", np.full((64, 80, 3), 200, np.uint8), photometric="rgb")
    meta_json = {"pixel_size_um_estimated": 2.0, "pixel_size_um_embedded": 0.25, "spot_diameter": 55.0,
                 "inter_spot_dist": 100.0, "st_technology": "Visium", "patient": "Patient 7"}
    (tmp / "metadata" / f"{sid}.json").write_text(json.dumps(meta_json))
    return tmp


def test_read_hest_sample(tmp_path):
    root = _write_hest(tmp_path)
    slide = read_hest(root)
    m = meta(slide)
    assert m.slide_id == "TENX1" and m.patient == "Patient 7"
    assert m.mpp == 2.0 and m.spot_diameter_px == pytest.approx(27.5) and m.counts
    assert m.image_path.endswith("TENX1.tif") and slide.n_obs == 5  # the in_tissue == 0 spot is dropped
    assert list(slide.obs["array_col"]) == [0, 2, 4, 6, 8]
    np.testing.assert_allclose(slide.obsm["spatial"][4], [42.0, 36.0])
    # The same sample through its h5ad path, and through read_any.
    assert read_hest(root / "st" / "TENX1.h5ad").n_obs == 5
    assert meta(read_any(root / "st" / "TENX1.h5ad")).source.startswith("read_hest")
    assert meta(read_any(root)).slide_id == "TENX1"


def test_read_hest_missing_wsi_and_several_samples(tmp_path):
    root = _write_hest(tmp_path)
    _write_hest(tmp_path, "TENX2")
    with pytest.raises(He2stInputError, match="holds 2 samples"):
        read_hest(root)
    cohort = read_any(root)
    assert cohort.slide_ids == ["TENX1", "TENX2"]
    (root / "wsis" / "TENX2.tif").unlink()
    with pytest.raises(MissingFileError, match=r"slide 'TENX2': no whole-slide image .*TENX2\.tif"):
        read_hest(root, "TENX2")


def test_read_h5ad_counts_detection_and_scalefactors(tmp_path):
    a = _anndata()
    a.uns["spatial"] = {"lib1": {"scalefactors": {"spot_diameter_fullres": 12.5},
                                 "metadata": {"software_version": "spaceranger-1.0.0"}}}
    a.write_h5ad(tmp_path / "raw.h5ad")
    slide = read_h5ad(tmp_path / "raw.h5ad")
    m = meta(slide)
    assert m.counts and m.slide_id == "lib1" and m.spot_diameter_px == 12.5 and m.mpp == pytest.approx(55 / 12.5)

    b = _anndata(X=np.log1p(np.arange(18).reshape(6, 3) % 4))
    b.write_h5ad(tmp_path / "lognorm.h5ad")
    with pytest.warns(UserWarning, match=r"slide 'lognorm': \.X of .*lognorm\.h5ad' is not raw counts"):
        norm = read_h5ad(tmp_path / "lognorm.h5ad", spot_diameter_px=5)
    assert meta(norm).counts is False and meta(norm).mpp is None
    with pytest.raises(NotCountsError, match="lognorm"):
        require_counts(norm, "HVG selection")

    b.layers["counts"] = sp.csr_matrix(np.arange(18).reshape(6, 3) % 4, dtype=np.float32)
    b.write_h5ad(tmp_path / "withlayer.h5ad")
    from_layer = read_h5ad(tmp_path / "withlayer.h5ad", spot_diameter_px=5)
    assert meta(from_layer).counts and "layers['counts']" in meta(from_layer).source
    np.testing.assert_array_equal(from_layer.X.toarray(), np.arange(18).reshape(6, 3) % 4)

    with pytest.raises(SlideError, match=r"lognorm\.h5ad' records no spot diameter"):
        read_h5ad(tmp_path / "lognorm.h5ad", counts=False)
    with pytest.raises(SlideError, match=r"counts in .*lognorm\.h5ad' are not integers"):
        read_h5ad(tmp_path / "lognorm.h5ad", counts=True, spot_diameter_px=5)


def test_read_h5ad_round_trip_keeps_metadata(tmp_path):
    c, s = _write_st(tmp_path)
    img = _image(tmp_path / "he.png", 300, 300)
    slide = read_st_legacy(c, s, image=img, patient="P")
    slide.write_h5ad(tmp_path / "saved.h5ad")
    back = read_h5ad(tmp_path / "saved.h5ad")
    m0, m1 = meta(slide), meta(back)
    assert (m1.slide_id, m1.patient, m1.image_path, m1.spot_diameter_px, m1.mpp) == (
        m0.slide_id, m0.patient, m0.image_path, m0.spot_diameter_px, m0.mpp)
    np.testing.assert_array_equal(back.X.toarray(), slide.X.toarray())
    assert list(back.obs["array_col"]) == list(slide.obs["array_col"])


def test_read_h5ad_bad_inputs(tmp_path):
    a = _anndata()
    del a.obsm["spatial"]
    a.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(SlideError, match=r"nospatial\.h5ad' has no obsm\['spatial'\]"):
        read_h5ad(tmp_path / "nospatial.h5ad", spot_diameter_px=4)
    sp_nan = _anndata().obsm["spatial"]
    sp_nan[2] = np.nan
    _anndata(spatial=sp_nan).write_h5ad(tmp_path / "nan.h5ad")
    with pytest.warns(UserWarning, match=r"slide 'nan': 1 spots .*NaN"):
        assert read_h5ad(tmp_path / "nan.h5ad", spot_diameter_px=4).n_obs == 5
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(SlideError, match=r"junk\.h5ad' is not a readable \.h5ad file"):
        read_h5ad(tmp_path / "junk.h5ad")


# ---------------------------------------------------------------------------
# read_any / summarize
# ---------------------------------------------------------------------------


def test_read_any_dispatch_and_errors(tmp_path):
    outs = _write_outs(tmp_path, "parquet", "h5")
    assert meta(read_any(outs)).source.startswith("read_visium")
    with pytest.raises(MissingFileError, match="does not exist"):
        read_any(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(He2stInputError, match=r"empty': not a recognised dataset folder"):
        read_any(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(He2stInputError, match="cannot tell what this file is"):
        read_any(tmp_path / "x.csv")


def test_summarize_slide_and_cohort(tmp_path):
    from he2st.data import Cohort

    c, s = _write_st(tmp_path)
    img = _image(tmp_path / "he.png", 300, 300)
    slide = read_st_legacy(c, s, image=img, patient="P")
    text = summarize(slide)
    assert "slide 'S1' (patient 'P')" in text
    assert "spots: 9   genes: 3" in text and "median 39 UMI per spot" in text  # row sums 3, 12, ..., 75: median 39
    assert "(300 x 300 px)" in text and "spot diameter: 50.0 px" in text and "2.000 µm/px" in text
    ctext = summarize(Cohort([slide], name="toy"))
    assert ctext.splitlines()[0] == "cohort 'toy': 1 slides, 1 patients, 9 spots; genes: 3 in every slide, 3 in any"
    assert "S1" in ctext.splitlines()[2] and "he.png" in ctext
