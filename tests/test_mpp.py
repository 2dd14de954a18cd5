"""Microns per pixel from image metadata (he2st.image.lazy.mpp): TIFF tags, OME-XML, Aperio, OpenSlide."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from he2st.errors import He2stInputError, UnknownMppError
from he2st.image import read_mpp, resolve_mpp
from he2st.image.lazy.mpp import (
    mpp_from_aperio_description,
    mpp_from_ome_xml,
    mpp_from_openslide_properties,
    mpp_from_tiff_resolution,
)

RGB = np.full((48, 64, 3), 200, np.uint8)
APERIO = (
    "Aperio Image Library v12.0.15\n64x48 [0,0 64x48] (240x240) JPEG/RGB Q=70"
    "|AppMag = 40|StripeWidth = 2040|ScanScope ID = SS1|MPP = 0.2520|Filename = s1"
)


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [((20000, 20000), "CENTIMETER", (0.5, "file:TIFF XResolution (cm)")),
     ((101600, 101600), "INCH", (0.25, "file:TIFF XResolution (inch)"))],
)
def test_tiff_resolution_tags(tmp_path, resolution, unit, expected) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, RGB, photometric="rgb", resolution=resolution, resolutionunit=unit)
    mpp, source = read_mpp(path)
    assert mpp == pytest.approx(expected[0]) and source == expected[1]


@pytest.mark.parametrize(("resolution", "unit"), [((72, 72), "INCH"), ((96, 96), "INCH"), ((5, 5), "NONE")])
def test_software_default_resolution_is_no_pixel_size(tmp_path, resolution, unit) -> None:
    path = tmp_path / "d.tif"
    tifffile.imwrite(path, RGB, photometric="rgb", resolution=resolution, resolutionunit=unit)
    assert read_mpp(path) is None


def test_ome_tiff_physical_size(tmp_path) -> None:
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, RGB, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.3, "PhysicalSizeXUnit": "µm"})
    assert read_mpp(path) == (pytest.approx(0.3), "file:OME PhysicalSizeX")
    nm = tmp_path / "b.ome.tif"
    tifffile.imwrite(nm, RGB, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm"})
    assert read_mpp(nm)[0] == pytest.approx(0.5)


def test_aperio_description(tmp_path) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, RGB, photometric="rgb", description=APERIO, metadata=None)
    assert read_mpp(path) == (pytest.approx(0.252), "file:aperio MPP")
    # an .svs goes to OpenSlide by extension; without OpenSlide its TIFF tags are still read
    svs = tmp_path / "a.svs"
    svs.write_bytes(path.read_bytes())
    assert read_mpp(svs) == (pytest.approx(0.252), "file:aperio MPP")


def test_metadata_parsers_on_strings() -> None:
    assert mpp_from_aperio_description(APERIO) == (pytest.approx(0.252), "file:aperio MPP")
    assert mpp_from_aperio_description("ImageJ=1.52\nMPP = 0.5") is None  # not an Aperio string
    assert mpp_from_aperio_description("Aperio Image Library|AppMag = 20") is None
    xml = '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="0.001" PhysicalSizeXUnit="mm"/></Image></OME>'
    assert mpp_from_ome_xml(xml)[0] == pytest.approx(1.0)
    assert mpp_from_ome_xml("<OME><Image><Pixels SizeX='3'/></Image></OME>") is None
    assert mpp_from_ome_xml("not xml") is None
    assert mpp_from_tiff_resolution((40000, 1), 3) == (pytest.approx(0.25), "file:TIFF XResolution (cm)")
    assert mpp_from_tiff_resolution((0, 1), 3) is None


def test_openslide_properties() -> None:
    props = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527", "openslide.vendor": "aperio"}
    assert mpp_from_openslide_properties(props) == (pytest.approx(0.2527), "file:openslide.mpp-x")
    assert mpp_from_openslide_properties({"openslide.vendor": "generic-tiff"}) is None
    assert mpp_from_openslide_properties({"openslide.mpp-x": "0"}) is None


def test_png_without_metadata_needs_mpp(tmp_path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(RGB).save(path)
    assert read_mpp(path) is None
    with pytest.raises(UnknownMppError, match=r"mpp=.*--mpp") as err:
        resolve_mpp(path)
    assert "a.png" in str(err.value) and isinstance(err.value, He2stInputError)
    assert resolve_mpp(path, 0.5) == (0.5, "user")
    with pytest.raises(He2stInputError, match="positive"):
        resolve_mpp(path, -1.0)


def test_user_mpp_wins_and_warns_on_mismatch(tmp_path) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, RGB, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    assert resolve_mpp(path) == (pytest.approx(0.5), "file:TIFF XResolution (cm)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_mpp(path, 0.51) == (0.51, "user")  # within 5 %: silent
    with pytest.warns(UserWarning, match="records 0.5"):
        assert resolve_mpp(path, 0.25) == (0.25, "user")


def test_openslide_branch_with_a_fake_module(tmp_path, monkeypatch) -> None:
    import he2st.image.lazy.mpp as mpp_mod

    class FakeSlide:
        def __init__(self, path: str) -> None:
            self.properties = {"openslide.mpp-x": "0.4990", "openslide.vendor": "hamamatsu"}

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    class FakeOpenSlide:
        OpenSlide = FakeSlide

    path = tmp_path / "a.ndpi"
    path.write_bytes(b"not really a slide")
    monkeypatch.setattr(mpp_mod, "openslide_module", lambda: FakeOpenSlide)
    assert read_mpp(path) == (pytest.approx(0.499), "file:openslide.mpp-x")
