"""Benchmark executors: local, processes and Ray give the same results; resume; seeds; random search."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from he2st.benchmark.config import BenchmarkConfig, RunConfigError, config_from_options
from he2st.benchmark.run import run_benchmark
from he2st.errors import He2stInputError
from he2st.evaluate.protocol import check_search, search_candidates

SYN = {"n_slides": 3, "n_spots": 120, "n_genes": 20, "patch_px": 32, "seed": 0}
SEARCH = {"method": "random", "n_trials": 3, "space": {"k": {"randint": [1, 40]}}}


def _config(out, syn_root, **kw) -> dict:
    d = {
        "out": str(out),
        "data": "synthetic",
        "data_params": {**SYN, "root": syn_root},
        # Deterministic methods (ridge adds nothing the executors could change, and costs seconds).
        "methods": ["mean", "knn"],
        "genes": "all",
        "encoder": "color_stats",
        "method_params": {"knn": {"k": 10}},
        "report": False,
        "quiet": True,
    }
    d.update(kw)
    return d


def _same_tables(a, b, names=("metrics.csv", "per_gene.csv", "summary.csv")) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, _module_cache):
    """The reference: the demo methods on the serial (local) executor."""
    out = tmp_path_factory.mktemp("local") / "run"
    run_benchmark(_config(out, _module_cache))
    return out


def test_processes_match_local_and_resume_across_executors(tmp_path, syn_root, local_run) -> None:
    out = tmp_path / "p"
    res = run_benchmark(_config(out, syn_root, executor="processes", workers=2))
    assert res.folds_run == 6 and res.folds_skipped == 0
    _same_tables(local_run, out)
    # A killed driver leaves some fold files: the rerun (another executor: not part of the
    # fingerprint) runs only the missing ones and gives the same tables.
    for f in ("folds/knn/syn1.json", "folds/mean/syn2.json"):
        (out / f).unlink()
    (out / "metrics.csv").unlink()
    res = run_benchmark(_config(out, syn_root, executor={"kind": "local"}))
    assert (res.folds_run, res.folds_skipped) == (2, 4)
    _same_tables(local_run, out)


def test_seeds_records_and_summary(tmp_path, syn_root) -> None:
    from typer.testing import CliRunner

    from he2st.cli import app

    out = tmp_path / "s"
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'genes = "all"\nencoder = "color_stats"\nreport = false\nsave_models = true\nexecutor = {{kind = "local"}}\n'
        f'[data_params]\nn_slides = 3\nn_spots = 120\nn_genes = 20\npatch_px = 32\nseed = 0\nroot = "{syn_root}"\n'
        '[method_params.knn]\nk = 10\n'
    )
    res = CliRunner().invoke(app, ["benchmark", "--config", str(toml), "--methods", "mean,knn", "--seeds", "0,1",
                                   "--executor", "local", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "12 method x fold pairs run" in res.output
    for seed in (0, 1):
        rec = json.loads((out / "folds" / "knn" / f"seed{seed}" / "syn0.json").read_text())
        assert rec["seed"] == seed and rec["params"]["seed"] == seed
    assert not (out / "folds" / "knn" / "syn0.json").exists()
    # Models travel back from the task as file bytes; the driver writes them (per seed).
    from he2st.methods import load_method

    assert load_method(out / "models" / "knn" / "seed1" / "syn0").params["seed"] == 1
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns[:8]) == ["method", "fold", "test_slide", "metric", "gene_set", "value", "n_genes", "n_nan"]
    assert sorted(m["seed"].unique()) == [0, 1]
    seeds = pd.read_csv(out / "summary_seeds.csv")
    row = seeds[(seeds.method == "knn") & (seeds.metric == "pcc") & (seeds.gene_set == "ACG")].iloc[0]
    assert row["n_seeds"] == 2 and row["sd"] == pytest.approx(0.0, abs=1e-12)  # knn does not use its seed
    summ = pd.read_csv(out / "summary.csv")
    assert (summ[summ.method == "knn"]["n_slides"] <= 3).all()  # over slides (seed means), not slide x seed
    # The one reader sees every seed; a rerun resumes all of them.
    from he2st.evaluate.results import read_run

    assert len(read_run(out).folds) == 12
    assert run_benchmark(_config(out, syn_root, methods=["mean", "knn"], seeds=[0, 1], save_models=True)).folds_skipped == 12


def test_seed_and_executor_options() -> None:
    cfg = config_from_options(None, seeds="0,1,2", executor="ray", workers=2, cpus_per_task=2)
    assert cfg.seeds == [0, 1, 2] and cfg.cpus_per_task == 2.0 and cfg.executor == "ray"
    base = BenchmarkConfig.from_dict({"out": "x"}).fingerprint()
    other = BenchmarkConfig.from_dict({"out": "y", "executor": {"kind": "processes", "workers": 3}})
    assert other.fingerprint() == base and other.workers == 3 and "seeds" not in base
    with pytest.raises(RunConfigError, match="executor"):
        BenchmarkConfig.from_dict({"executor": "threads"})
    with pytest.raises(RunConfigError, match="seeds"):
        config_from_options(None, seeds="0,x")
    with pytest.raises(RunConfigError, match="twice"):
        BenchmarkConfig.from_dict({"seeds": [1, 1]})


def test_search_spec_and_sampler() -> None:
    space = {"method": "random", "n_trials": 5, "space": {
        "lr": {"loguniform": [1e-4, 1e-1]}, "k": {"randint": [1, 5]}, "m": {"choice": ["a", "b"]}, "x": {"uniform": [0, 1]}}}
    a, b = search_candidates(space, seed=3), search_candidates(space, seed=3)
    assert a == b and len(a) == 5 and a != search_candidates(space, seed=4)
    assert all(1e-4 <= c["lr"] <= 1e-1 and 1 <= c["k"] < 5 and c["m"] in "ab" and 0 <= c["x"] <= 1 for c in a)
    for bad in ({"method": "grid", "n_trials": 1, "space": {"k": {"choice": [1]}}},
                {"n_trials": 0, "space": {"k": {"choice": [1]}}},
                {"n_trials": 2, "space": {"k": {"loguniform": [0, 1]}}},
                {"n_trials": 2, "space": {"k": {"normal": [0, 1]}}}):
        with pytest.raises(He2stInputError):
            check_search(bad)
    with pytest.raises(RunConfigError, match="unknown parameter"):
        BenchmarkConfig.from_dict({"methods": ["knn"], "search": {"knn": {"n_trials": 2, "space": {"kk": {"choice": [1]}}}}})
    with pytest.raises(RunConfigError, match="not both"):
        BenchmarkConfig.from_dict({"methods": ["knn"], "grid": {"knn": {"k": [1]}}, "search": {"knn": SEARCH}})


def test_random_search_is_nested_and_never_sees_the_test_slide(tmp_path, syn_root, monkeypatch) -> None:
    from he2st.evaluate import protocol

    seen = []
    real = protocol.fit_on

    def spy(method_name, params, train, val, *a, **kw):
        seen.append(([s.uns["he2st"]["slide_id"] for s in train], [s.uns["he2st"]["slide_id"] for s in val]))
        return real(method_name, params, train, val, *a, **kw)

    monkeypatch.setattr(protocol, "fit_on", spy)
    out = tmp_path / "n"
    run_benchmark(_config(out, syn_root, methods=["knn"], split="nested", search={"knn": SEARCH}))
    rec = json.loads((out / "folds" / "knn" / "syn0.json").read_text())
    sel = rec["selection"]
    assert [c["params"] for c in sel["candidates"]] == search_candidates(SEARCH, seed=0)
    assert sel["inner_folds"] == ["syn0-inner-syn1", "syn0-inner-syn2"] and sel["search"] == SEARCH
    assert rec["params"]["k"] == sel["best"]["k"]
    # 3 outer folds x (3 candidates x 2 inner folds + 1 final fit); inner fits never hold the outer test slide.
    assert len(seen) == 3 * 7
    for i, (train, val) in enumerate(seen):
        outer_test = f"syn{i // 7}"
        if i % 7 < 6:
            assert outer_test not in train + val and len(train) == 1


# -- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module's Ray tests (startup costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_matches_local(tmp_path, syn_root, local_run, ray_instance) -> None:
    out = tmp_path / "r"
    res = run_benchmark(_config(out, syn_root, executor="ray", cpus_per_task=1))
    assert res.folds_run == 6
    _same_tables(local_run, out)
    assert ray_instance.is_initialized()  # an instance the executor did not start is left running
    with pytest.raises(He2stInputError, match="gpus-per-task"):  # infeasible: refused, not a hang
        run_benchmark(_config(tmp_path / "g", syn_root, executor="ray", gpus_per_task=1))


@pytest.mark.ray
def test_ray_worker_killed_is_retried_and_search_matches(tmp_path, syn_root, ray_instance, monkeypatch) -> None:
    cfg = _config(tmp_path / "l", syn_root, methods=["knn"], split="nested", search={"knn": SEARCH})
    run_benchmark(cfg)
    marker = tmp_path / "crashed"
    monkeypatch.setenv("HE2ST_EXECUTOR_CRASH_ONCE", str(marker))
    out = tmp_path / "r"
    res = run_benchmark({**cfg, "out": str(out), "executor": "ray"})
    assert marker.is_file()  # a worker died (os._exit) in its first fit task ...
    assert res.folds_run == 3  # ... which Ray ran again: the run completed
    _same_tables(tmp_path / "l", out)
    for f in ("syn0", "syn1", "syn2"):
        a = json.loads((tmp_path / "l" / "folds" / "knn" / f"{f}.json").read_text())["selection"]
        b = json.loads((out / "folds" / "knn" / f"{f}.json").read_text())["selection"]
        assert a["candidates"] == b["candidates"] and a["best"] == b["best"]


def test_ray_missing_or_unreachable_is_an_input_error(tmp_path, syn_root, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(He2stInputError, match="ray package"):
        run_benchmark(_config(tmp_path / "x", syn_root, executor="ray"))


def test_run_graph_failures_and_progress(monkeypatch, capsys) -> None:
    from he2st.benchmark import executor as ex

    calls = []

    def task(payload, cohort):
        calls.append(payload["i"])
        if payload.get("boom"):
            raise ValueError(f"bad task {payload['i']}")
        return payload["i"]

    monkeypatch.setitem(ex.TASKS, "fit", task)
    monkeypatch.setitem(ex.TASKS, "feature", task)
    monkeypatch.delenv("HE2ST_QUIET", raising=False)
    got = []
    tasks = [
        ex.Task("features s1", "feature", {"i": 0, "boom": True}),
        ex.Task("fit a", "fit", {"i": 1}, deps=["features s1"], on_done=got.append),
        ex.Task("fit b", "fit", {"i": 2, "boom": True}, deps=["features s1"], on_done=got.append),
        ex.Task("fit c", "fit", {"i": 3}, deps=["features s1"], on_done=got.append),
    ]
    local = ex.make_executor("local")
    local.start(None)
    with pytest.raises(ValueError, match="bad task 2"):
        ex.run_graph(local, tasks)
    # A failed feature task does not block its fits; after a failed fit, queued fits never start.
    assert calls == [0, 1, 2] and got == [1]
    err = capsys.readouterr().err
    assert "features s1 FAILED: ValueError" in err and "tasks 1/4 done, 0 running, 2 failed" in err
    with pytest.raises(ex.ExecutorError, match="threads"):
        ex.make_executor("threads")


@pytest.mark.ray
def test_random_search_through_ray_tune_matches_local(tmp_path, syn_root, ray_instance) -> None:
    """backend='tune': one Ray Tune trial per candidate; same candidates, scores and choices as in-process."""
    local = tmp_path / "l"
    run_benchmark(_config(local, syn_root, methods=["knn"], split="nested", search={"knn": SEARCH}))
    tuned = tmp_path / "t"
    spec = {**SEARCH, "backend": "tune"}
    run_benchmark(_config(tuned, syn_root, methods=["knn"], split="nested", search={"knn": spec}))
    for f in ("syn0", "syn1", "syn2"):
        a = json.loads((local / "folds" / "knn" / f"{f}.json").read_text())["selection"]
        b = json.loads((tuned / "folds" / "knn" / f"{f}.json").read_text())["selection"]
        assert a["candidates"] == b["candidates"] and a["best"] == b["best"] and b["search"]["backend"] == "tune"
    assert (local / "metrics.csv").read_bytes() == (tuned / "metrics.csv").read_bytes()
    with pytest.raises(He2stInputError, match="backend"):
        check_search({**SEARCH, "backend": "optuna"})
