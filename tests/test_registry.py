"""The method registry: discovered built-ins, the decorator, entry points, ``he2st methods``."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from he2st.errors import He2stInputError
from he2st.methods import registry
from he2st.methods.base import Method


def test_every_method_module_registers_what_it_declares() -> None:
    """A name found by reading a file's decorators is registered, by that file, on import."""
    declared = registry.builtin_methods()
    files = sorted(p.stem for p in Path(registry.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    by_module: dict[str, set[str]] = {}
    for name, module in declared.items():
        by_module.setdefault(module, set()).add(name)
    for stem in files:
        if stem in ("base", "registry"):
            continue
        module = importlib.import_module(f"he2st.methods.{stem}")
        registered = {n for n, cls in registry._REGISTRY.items() if cls.__module__ == module.__name__}
        assert registered == by_module.get(module.__name__, set()), stem
    assert {"mean", "ridge", "knn", "stnet", "hist2st", "bleep", "cmrcnet"} <= set(declared)


def test_every_method_states_family_paper_and_defaults() -> None:
    for name in registry.list_methods():
        info = registry.method_info(name)
        assert info["family"] in ("baseline", "spot", "slide", "contrastive", "graph", "meta"), name
        assert info["summary"], name
        if info["family"] not in ("baseline", "meta"):
            assert info["paper"], f"{name} cites no paper"
        assert {"normalization", "seed"} <= set(info["defaults"])


def test_listing_imports_no_torch() -> None:
    import subprocess

    code = "import sys; from he2st.methods.registry import list_methods; n = list_methods(); print('torch' in sys.modules, len(n))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and int(out[1]) >= 13


def test_decorator_refuses_non_methods_and_name_clashes() -> None:
    with pytest.raises(TypeError):
        registry.register_method("not_a_method")(object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("mean")(type("Other", (registry.get_method_class("mean"),), {}))
    with pytest.raises(He2stInputError, match="unknown method 'nope'"):
        registry.get_method_class("nope")


_PLUGIN = textwrap.dedent(
    '''
    import numpy as np
    from he2st.methods.base import Method


    class Constant(Method):
        """Predicts a constant 1.0 everywhere (a third-party test method)."""

        family = "baseline"
        defaults = {"value": 1.0}

        def _fit(self, train_slides, val_slides):
            pass

        def predict(self, slide):
            return np.full((slide.n_obs, len(self.genes)), self.params["value"], dtype=np.float32)

        def get_state(self):
            return {"value": np.asarray([self.params["value"]], dtype=np.float32)}

        def set_state(self, state):
            pass
    '''
)


def _install(tmp_path, monkeypatch, module: str, source: str, entry: str) -> None:
    """An installed distribution (module + dist-info with one ``he2st.methods`` entry point) on sys.path."""
    (tmp_path / f"{module}.py").write_text(source)
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[he2st.methods]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A package on sys.path that declares a method through the ``he2st.methods`` entry-point group."""
    _install(tmp_path, monkeypatch, "he2st_plugin_test", _PLUGIN, "constant_test = he2st_plugin_test:Constant")
    yield "constant_test"
    registry._REGISTRY.pop("constant_test", None)
    sys.modules.pop("he2st_plugin_test", None)


def test_entry_point_method_from_python_toml_and_cli(plugin, tmp_path) -> None:
    from typer.testing import CliRunner

    from he2st.cli import app

    assert plugin in registry.list_methods()
    m = registry.create_method(plugin, value=2.0)
    assert isinstance(m, Method) and m.name == plugin
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'out = "{out}"\ndata = "synthetic"\ndata_params = {{ n_slides = 2, n_spots = 60, n_genes = 12 }}\n'
        f'methods = ["mean", "{plugin}"]\ngenes = "all"\nn_top = 5\nreport = false\n'
    )
    res = CliRunner().invoke(app, ["--quiet", "benchmark", "--config", str(toml)])
    assert res.exit_code == 0, res.output
    assert plugin in res.output
    metrics = (out / "metrics.csv").read_text()
    assert plugin in metrics
    res = CliRunner().invoke(app, ["methods", plugin])
    assert res.exit_code == 0 and "value = 1.0" in res.output


def test_entry_point_that_is_not_a_method(tmp_path, monkeypatch) -> None:
    _install(tmp_path, monkeypatch, "he2st_bad_plugin", "X = 1\n", "bad_test = he2st_bad_plugin:X")
    with pytest.raises(He2stInputError, match="not a he2st Method subclass"):
        registry.get_method_class("bad_test")


def test_cli_methods_and_encoders_listings() -> None:
    from typer.testing import CliRunner

    from he2st.cli import app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    for name in ("ridge", "stnet", "hist2st", "bleep"):
        assert name in res.output
    assert "Zeng" in res.output or "Hist2ST" in res.output
    res = CliRunner().invoke(app, ["methods", "stnet"])
    assert res.exit_code == 0 and "epochs" in res.output and "spot" in res.output
    res = CliRunner().invoke(app, ["methods", "nope"])
    assert res.exit_code == 2 and "unknown method" in res.output
    res = CliRunner().invoke(app, ["encoders"])
    assert res.exit_code == 0 and "efficientnet_lite0" in res.output and "imagenet" in res.output
