"""ST array layouts ("1k" grid, "2k" checkerboard) and the mpp each implies; mpp_source in the readers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from he2st.errors import InferredMppWarning
from he2st.io import read_st_legacy
from he2st.io.st_legacy import detect_st_array


def _write_section(folder, cells, px_per_unit=50.0):
    """A tiny ST section: counts and spot table for integer array cells (x, y)."""
    ids = [f"{x}x{y}" for x, y in cells]
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.integers(0, 9, size=(len(cells), 3)), index=ids, columns=["GA", "GB", "GC"])
    counts.to_csv(folder / "S1.tsv", sep="\t")
    spots = pd.DataFrame(
        {
            "x": [x for x, _ in cells],
            "y": [y for _, y in cells],
            "pixel_x": [100 + px_per_unit * x for x, _ in cells],
            "pixel_y": [80 + px_per_unit * y for _, y in cells],
            "selected": 1,
        }
    )
    spots.to_csv(folder / "S1_selection.tsv", sep="\t", index=False)
    return folder / "S1.tsv", folder / "S1_selection.tsv"


FULL = [(x, y) for x in range(2, 9) for y in range(2, 9)]
CHECKER = [(x, y) for x, y in FULL if (x + y) % 2 == 0]


def test_detect_layout() -> None:
    assert detect_st_array(np.array(FULL)) == "1k"
    assert detect_st_array(np.array(CHECKER)) == "2k"
    # a sparse 1k section whose spots happen to share a parity but are never diagonal neighbours
    assert detect_st_array(np.array([(0, 0), (2, 0), (4, 2)])) == "1k"


def test_2k_checkerboard_is_100_um_per_unit(tmp_path) -> None:
    counts, spots = _write_section(tmp_path, CHECKER, px_per_unit=50.0)
    with pytest.warns(InferredMppWarning, match="ST 2k array"):
        s = read_st_legacy(counts, spots)
    m = s.uns["he2st"]
    assert m["mpp"] == pytest.approx(2.0)  # 100 µm per unit / 50 px per unit
    assert m["mpp_source"].startswith("lattice:ST 2k array") and "100 µm per array unit" in m["mpp_source"]
    assert m["spot_diameter_px"] == pytest.approx(50.0)  # 100 µm spots
    # the same table read as a 1k array, on request
    with pytest.warns(InferredMppWarning, match="ST 1k array"):
        s1 = read_st_legacy(counts, spots, array_type="1k")
    assert s1.uns["he2st"]["mpp"] == pytest.approx(4.0)


def test_1k_grid_and_user_mpp(tmp_path) -> None:
    counts, spots = _write_section(tmp_path, FULL, px_per_unit=50.0)
    with pytest.warns(InferredMppWarning):
        s = read_st_legacy(counts, spots)
    assert s.uns["he2st"]["mpp"] == pytest.approx(4.0)  # 200 µm per unit
    assert s.uns["he2st"]["mpp_source"].startswith("lattice:ST 1k array")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", InferredMppWarning)
        given = read_st_legacy(counts, spots, mpp=3.9)
    assert given.uns["he2st"]["mpp"] == 3.9 and given.uns["he2st"]["mpp_source"] == "user"
    with pytest.raises(ValueError, match="array_type"):
        read_st_legacy(counts, spots, array_type="3k")


def test_her2st_sections_are_1k_arrays(her2st_root) -> None:
    for sec in ("A2", "C2", "H1"):
        spots = pd.read_csv(her2st_root / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")
        assert detect_st_array(spots[["x", "y"]].to_numpy(int)) == "1k"
    with pytest.warns(InferredMppWarning, match="ST 1k array"):
        s = read_st_legacy(her2st_root / "ST-cnts" / "C2.tsv.gz", her2st_root / "ST-spotfiles" / "C2_selection.tsv")
    m = s.uns["he2st"]
    assert m["mpp_source"] == "lattice:ST 1k array (detected from the spot coordinates), 200 µm per array unit"
    # her2st's ~291 px pitch (image_index.tsv) -> 200 / 291 µm per pixel
    assert m["mpp"] == pytest.approx(200.0 / 290.7, rel=0.01)


def test_visium_crop_records_mpp_source(squidpy_root) -> None:
    from he2st.datasets import visium_mouse_brain_crop

    s = visium_mouse_brain_crop(squidpy_root)
    assert s.uns["he2st"]["mpp_source"]


def test_visium_inferred_mpp_warns_and_user_mpp_does_not(shared_data) -> None:
    # A real Space Ranger v1 output: µm per pixel from the 100 µm spot lattice, with a warning;
    # a value the user gives is recorded as such, silently.
    import warnings

    from he2st.errors import InferredMppWarning
    from he2st.io import read_visium

    outs = shared_data / "visium_mouse_muscle_scmuscle" / "Vis5A_2dpi"
    if not (outs / "filtered_feature_bc_matrix.h5").is_file():
        pytest.skip(f"{outs} is absent")
    with pytest.warns(InferredMppWarning, match=r"µm per pixel inferred \(Visium array, 100 µm spot pitch\)"):
        s = read_visium(outs)
    assert s.uns["he2st"]["mpp_source"] == "lattice:Visium array, 100 µm spot pitch"
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferredMppWarning)
        t = read_visium(outs, mpp=s.uns["he2st"]["mpp"])
    assert t.uns["he2st"]["mpp_source"] == "user"
