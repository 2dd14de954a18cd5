"""Benchmarks: run every method on every fold of a cohort into a resumable run folder.

::

    from he2st.benchmark import run_benchmark
    result = run_benchmark({"data": "synthetic", "methods": ["mean", "ridge", "knn"],
                            "split": "loso", "encoder": "color_stats", "out": "runs/demo"})
    print(result.format_table())

- :mod:`~he2st.benchmark.config`: :class:`BenchmarkConfig`, TOML loading, method specs.
- :mod:`~he2st.benchmark.run`: :func:`run_benchmark` and :func:`aggregate`.
- :mod:`~he2st.benchmark.provenance`: ``config.json`` (versions, seeds, commit), checked on resume.
- :mod:`~he2st.benchmark.demo`: ``he2st demo``.

The run folder is read back with :func:`he2st.evaluate.read_run`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchmarkConfig": "config",
    "MethodSpec": "config",
    "RunConfigError": "config",
    "DEMO_METHODS": "config",
    "config_from_options": "config",
    "load_config": "config",
    "run_benchmark": "run",
    "aggregate": "run",
    "demo_config": "demo",
    "run_demo": "demo",
    "format_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"he2st.benchmark.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'he2st.benchmark' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
