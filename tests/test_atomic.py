"""Atomic writes leave no temp files and give new files the permissions of the user's umask."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from he2st._utils import atomic_dir, atomic_path, atomic_write_json, current_umask, jsonable


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask) -> None:
    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    with atomic_dir(tmp_path / "model") as d:
        (d / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask
    # A plain open() gives the same modes: he2st's files are like any other.
    (tmp_path / "plain").write_text("x")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~mask


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path) -> None:
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_jsonable_round_trip() -> None:
    value = {"a": (1, 2), "b": np.float32(0.5), "c": np.arange(3), 4: {"s": {2, 1}}}
    assert jsonable(value) == {"a": [1, 2], "b": 0.5, "c": [0, 1, 2], "4": {"s": [1, 2]}}
    with pytest.raises(TypeError):
        jsonable({"x": object()})
