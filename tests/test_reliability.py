"""Reliability of the runner and the CLI: one writer per run folder, no temp file read as a
result, injective file names, validation before writing, clean one-line CLI errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from he2st.benchmark.run import BenchmarkConfig, RunConfigError, run_benchmark
from he2st.cli import app
from he2st.errors import He2stInputError

SYN = {"n_slides": 3, "n_spots": 60, "n_genes": 12, "patch_px": 32, "seed": 0}


def _config(out, syn_root, **kw) -> dict:
    d = {
        "out": str(out),
        "data": "synthetic",
        "data_params": {**SYN, "root": syn_root},
        "methods": ["mean"],
        "genes": "all",
        "report": False,
        "quiet": True,
    }
    d.update(kw)
    return d


def _toml(path: Path, syn_root: str, methods: str = '["mean"]', extra: str = "") -> Path:
    path.write_text(
        f'data = "synthetic"\nmethods = {methods}\ngenes = "all"\nreport = false\nquiet = true\n{extra}\n'
        f"[data_params]\n" + "".join(f"{k} = {v}\n" for k, v in SYN.items()) + f'root = "{syn_root}"\n'
    )
    return path


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if ".tmp" in p.name or p.suffix == ".json"]


def _one_line_error(output: str) -> str:
    # Warnings are one "warning:" line each (he2st.cli._warning_line); the error must be one line.
    lines = [x for x in output.strip().splitlines() if x.strip() and not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# -- 1. one writer per run folder ------------------------------------------------------------

_SLOW = textwrap.dedent(
    """
    import sys, time
    from he2st.methods import register_method
    from he2st.methods.baselines import MeanPredictor

    @register_method("sleepy_mean")
    class SleepyMean(MeanPredictor):
        \"\"\"The mean baseline, sleeping a minute per slide: a run that holds its folder.\"\"\"

        def predict(self, slide):
            time.sleep(60)
            return super().predict(slide)

    from he2st.cli import app
    app(sys.argv[1:], prog_name="he2st")
    """
)


def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path, syn_root) -> None:
    toml = _toml(tmp_path / "run.toml", syn_root, methods='["sleepy_mean"]')
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW, "benchmark", "--config", str(toml), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "config.json").is_file():
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        assert (out / "config.json").is_file()
        second = CliRunner().invoke(app, ["benchmark", "--config", str(_toml(tmp_path / "m.toml", syn_root)), "--out", str(out)])
        assert second.exit_code == 2
        line = _one_line_error(second.output)
        assert str(out) in line and f"pid {first.pid}" in line
        assert not (out / "folds" / "mean").exists()  # the refused writer wrote nothing
    finally:
        first.kill()  # SIGKILL: the holder dies without clean-up
        first.wait()
    # the dead holder's lock is taken over, with a message
    again = CliRunner().invoke(app, ["benchmark", "--config", str(_toml(tmp_path / "m.toml", syn_root)), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "taking over the lock" in again.output and f"pid {first.pid}" in again.output


def test_lock_is_released_and_out_is_checked(tmp_path) -> None:
    from he2st.benchmark.lock import RunFolderBusyError, run_lock

    with run_lock(tmp_path / "a"):
        with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path / "a"):
                pass
    with run_lock(tmp_path / "a"):  # released on exit
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(He2stInputError, match="not a folder"):
        with run_lock(tmp_path / "file"):
            pass


# -- 2. leftover temp files ------------------------------------------------------------------


def test_leftover_temp_files_are_never_read_and_are_cleaned(tmp_path, syn_root) -> None:
    cfg = _config(tmp_path / "run", syn_root)
    first = run_benchmark(cfg)
    folds = tmp_path / "run" / "folds" / "mean"
    complete = (folds / "syn0.json").read_text()
    # what a kill inside a write leaves: a complete and an empty temp file, old and new names
    (folds / ".syn0.json.k2j3h4x_.json").write_text(complete)
    (folds / ".syn1.json.abcdefgh.json").write_text("")
    (folds / ".syn2.json.abcdefgh.tmp").write_text("")
    (folds / ".syn0.json.zzzzzzzz.tmp").write_text(complete)
    (folds / "syn2.json").unlink()
    res = run_benchmark(cfg)
    assert res.folds_run == 1 and res.folds_skipped == 2
    pd.testing.assert_frame_equal(res.metrics, first.metrics)  # each fold counted once
    assert _temp_files(tmp_path / "run") == []


def test_atomic_temp_names_never_match_the_target_pattern(tmp_path) -> None:
    from he2st._utils import atomic_path

    with atomic_path(tmp_path / "a.json") as tmp:
        assert not tmp.name.endswith(".json") and tmp.name.startswith(".a.json.")
        assert not list(tmp_path.glob("*.json"))
    with atomic_path(tmp_path / "p.h5ad", suffix=".h5ad") as tmp:
        assert tmp.suffix == ".h5ad" and ".tmp" in tmp.name


# -- 3. injective file names -----------------------------------------------------------------


def test_slide_ids_that_sanitise_alike_keep_their_own_files(tmp_path, syn_root) -> None:
    from he2st.data import Cohort
    from he2st.datasets import synthetic

    base = synthetic(**SYN, root=syn_root)
    slides = []
    for a, new in zip(base, ["x/1", "x_1", "x 1"]):
        a = a.copy()
        a.uns["he2st"] = {**a.uns["he2st"], "slide_id": new}
        a.obs["slide"] = new
        slides.append(a)
    cohort = Cohort(slides, name="clash")
    res = run_benchmark(_config(tmp_path / "run", syn_root), cohort=cohort)
    assert res.folds_run == 3
    assert sorted(set(res.metrics["test_slide"])) == ["x 1", "x/1", "x_1"]
    assert len(list((tmp_path / "run" / "folds" / "mean").glob("*.json"))) == 3
    assert len(list((tmp_path / "run" / "predictions" / "mean").glob("*.h5ad"))) == 3
    again = run_benchmark(_config(tmp_path / "run", syn_root), cohort=cohort)
    assert again.folds_skipped == 3
    pd.testing.assert_frame_equal(again.metrics, res.metrics)


def test_resume_checks_the_recorded_fold_name(tmp_path, syn_root) -> None:
    cfg = _config(tmp_path / "run", syn_root)
    run_benchmark(cfg)
    path = tmp_path / "run" / "folds" / "mean" / "syn1.json"
    rec = json.loads(path.read_text())
    rec["fold"]["name"] = "another"
    path.write_text(json.dumps(rec))
    with pytest.raises(RunConfigError, match="another"):
        run_benchmark(cfg)


# -- 4. validate before writing --------------------------------------------------------------


def test_a_run_that_fails_validation_writes_nothing(tmp_path, syn_root) -> None:
    toml = _toml(tmp_path / "run.toml", syn_root)
    out = tmp_path / "run"
    bad = CliRunner().invoke(app, ["benchmark", "--config", str(toml), "--out", str(out), "--genes", "hvg:abc"])
    assert bad.exit_code == 2 and "hvg:abc" in _one_line_error(bad.output)
    assert not (out / "config.json").exists()
    for opt in (["--split", "kfold:x"], ["--methods", "nope"], ["--genes", str(tmp_path / "missing.txt")]):
        res = CliRunner().invoke(app, ["benchmark", "--config", str(toml), "--out", str(out), *opt])
        assert res.exit_code == 2, res.output
        assert not (out / "config.json").exists(), opt
    good = CliRunner().invoke(app, ["benchmark", "--config", str(toml), "--out", str(out), "--genes", "hvg:5"])
    assert good.exit_code == 0, good.output


# -- 5. values of the wrong type -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("genes = 12", r"'genes'.*12"),
        ('seed = "a"', r"'seed'.*integer"),
        ('methods = "mean"', r"'methods'.*list"),
        ("n_top = 2.5", r"'n_top'"),
        ("patch_px = -5", r"'patch_px'.*positive"),
        ('save_models = "yes"', r"'save_models'.*true or false"),
        ('markers = "GENE001"', r"'markers'.*list"),
        ('[method_params.ridge]\nalphas = "big"', r"ridge.*'alphas'.*list"),
        ('[method_params.knn]\nk = "ten"', r"knn.*'k'.*number"),
        ('[method_params.mean]\nnormalization = 3', r"mean.*'normalization'.*str"),
        ('[method_params]\nknn = 3', r"'method_params'.*knn.*table"),
        ('[grid]\nknn = {k = 3}', r"'grid'.*knn.*'k'.*list"),
    ],
)
def test_values_of_the_wrong_type_name_the_key(tmp_path, syn_root, extra, match) -> None:
    from he2st.benchmark.config import load_config

    toml = tmp_path / "run.toml"
    methods = "" if extra.startswith("methods") else 'methods = ["mean", "ridge", "knn"]\n'
    toml.write_text(f"{methods}{extra}\n")
    with pytest.raises(RunConfigError, match=match):
        load_config(toml)


def test_data_params_must_be_a_table(tmp_path) -> None:
    with pytest.raises(RunConfigError, match=r"'data_params'.*table"):
        BenchmarkConfig.from_dict({"data_params": "x"})


def test_cli_patch_px_negative_is_one_line(tmp_path) -> None:
    res = CliRunner().invoke(app, ["benchmark", "--patch-px", "-5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "patch_px" in _one_line_error(res.output)
    assert not (tmp_path / "o").exists()


def test_method_rejects_parameters_of_the_wrong_type() -> None:
    from he2st.methods import create_method

    with pytest.raises(He2stInputError, match=r"'alphas'.*list"):
        create_method("ridge", alphas="big")
    with pytest.raises(He2stInputError, match=r"'k'.*number"):
        create_method("knn", k="3")
    create_method("knn", k=3, patch_px=None)  # None keeps a default off


# -- 6. CLI errors ---------------------------------------------------------------------------


def _bench(tmp_path, syn_root, *args):
    toml = _toml(tmp_path / "run.toml", syn_root)
    return CliRunner().invoke(app, [*args[:1], "benchmark", "--config", str(toml), *args[1:]] if args and args[0] == "--debug"
                              else ["benchmark", "--config", str(toml), *args])


def test_cli_out_is_an_existing_file(tmp_path, syn_root) -> None:
    (tmp_path / "f").write_text("x")
    res = _bench(tmp_path, syn_root, "--out", str(tmp_path / "f"))
    assert res.exit_code == 2 and str(tmp_path / "f") in _one_line_error(res.output)


def test_cli_read_only_out(tmp_path, syn_root, monkeypatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the lock file's creation fail as it would
        import he2st.benchmark.lock as lock

        real_open = os.open

        def deny(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(lock.os, "open", deny)
    try:
        res = _bench(tmp_path, syn_root, "--out", str(ro / "run"))
    finally:
        ro.chmod(0o755)
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert str(ro) in line and "ermission denied" in line


def test_cli_disk_full(tmp_path, syn_root, monkeypatch) -> None:
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    res = _bench(tmp_path, syn_root, "--out", str(tmp_path / "run"))
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert "metrics.csv" in line and "No space left on device" in line
    assert _temp_files(tmp_path / "run") == []


def test_cli_unexpected_error_and_debug(tmp_path, syn_root, monkeypatch) -> None:
    import he2st.evaluate.protocol as protocol

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(protocol, "run_fold", boom)
    res = _bench(tmp_path, syn_root, "--out", str(tmp_path / "run"))
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert "ZeroDivisionError: boom" in line and "--debug" in line
    dbg = _bench(tmp_path, syn_root, "--debug", "--out", str(tmp_path / "run"))
    assert dbg.exit_code != 0 and isinstance(dbg.exception, ZeroDivisionError)


def test_cli_keyboard_interrupt(tmp_path, syn_root, monkeypatch) -> None:
    import he2st.evaluate.protocol as protocol

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol, "run_fold", stop)
    res = _bench(tmp_path, syn_root, "--out", str(tmp_path / "run"))
    assert res.exit_code == 130
    assert "interrupted" in _one_line_error(res.output)


# -- 7. kills at random points ---------------------------------------------------------------

_DEMO = {"n_slides": 4, "n_spots": 120, "n_genes": 20, "patch_px": 32, "seed": 0}


@pytest.mark.slow
def test_killed_at_random_points_then_resumed_gives_identical_tables(tmp_path, syn_root) -> None:
    import random

    toml = tmp_path / "demo.toml"
    toml.write_text(
        'data = "synthetic"\nmethods = ["mean", "ridge", "knn"]\nencoder = "color_stats"\ngenes = "hvg:30"\n'
        "report = false\nquiet = true\n[data_params]\n" + "".join(f"{k} = {v}\n" for k, v in _DEMO.items())
        + f'root = "{syn_root}"\n'
    )
    ref = tmp_path / "ref"
    run_benchmark(BenchmarkConfig.from_dict({**_load(toml), "out": str(ref)}))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "he2st.cli", "benchmark", "--config", str(toml), "--out", str(out)]
    # Each write sleeps between writing and renaming, so kills land inside writes too.
    env = {**os.environ, "HE2ST_ATOMIC_DELAY_S": "0.05"}
    rng = random.Random(13)
    t0, kills = time.time(), 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (out / "he2st.lock").is_file() and time.time() - t0 < 50:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2  # the run was really interrupted, more than once
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    for name in ("metrics.csv", "summary.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _temp_files(out) == []


def _load(toml: Path) -> dict:
    import tomllib

    return tomllib.loads(toml.read_text())


# -- properties to keep: hostile ids and a really full disk ------------------------------------


def _renamed(syn_root: str, ids: list[str]):
    from he2st.data import Cohort
    from he2st.datasets import synthetic

    slides = []
    for a, new in zip(synthetic(**SYN, root=syn_root), ids):
        a = a.copy()
        a.uns["he2st"] = {**a.uns["he2st"], "slide_id": new}
        a.obs["slide"] = new
        slides.append(a)
    return Cohort(slides, name="hostile")


def test_path_like_slide_ids_stay_inside_the_run_folder(tmp_path, syn_root) -> None:
    out = tmp_path / "a" / "run"
    cohort = _renamed(syn_root, ["../../evil", "/etc/x", ".."])
    res = run_benchmark(_config(out, syn_root, report=True), cohort=cohort)
    assert res.folds_run == 3
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert outside == []
    assert sorted(set(res.metrics["test_slide"])) == ["..", "../../evil", "/etc/x"]


def test_html_in_ids_and_gene_names_is_escaped_in_the_report(tmp_path, syn_root) -> None:
    cohort = _renamed(syn_root, ["<script>alert(1)</script>", "<b>s2</b>", "s3"])
    for a in cohort:
        a.var_names = [f"<img src=x onerror=alert({i})>" if i == 0 else g for i, g in enumerate(a.var_names)]
    res = run_benchmark(_config(tmp_path / "run", syn_root, report=True, methods=["mean", "ridge"]), cohort=cohort)
    text = res.report.read_text()
    assert "<script>alert" not in text and "<img src=x" not in text and "<b>s2</b>" not in text
    assert "&lt;b&gt;s2&lt;/b&gt;" in text


def test_a_really_full_disk_is_one_error_line(tmp_path, syn_root) -> None:
    """A tiny tmpfs as --out (needs root and mount; skipped elsewhere): no crash, no traceback."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        toml = _toml(tmp_path / "run.toml", syn_root, methods='["mean", "ridge"]')
        env = {**os.environ, "HE2ST_QUIET": "1"}
        res = subprocess.run(
            [sys.executable, "-m", "he2st.cli", "benchmark", "--config", str(toml), "--out", str(mnt / "run")],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
        # the 12-gene panel's GeneSetSizeWarning is one "warning:" line, not a source excerpt
        assert any(x.startswith("warning: ") and "n_top=50" in x for x in res.stderr.splitlines()), res.stderr
        assert "run_fold(" not in res.stderr
        line = _one_line_error(res.stderr)
        assert "space" in line
        assert not [p for p in mnt.rglob("*") if ".tmp" in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
