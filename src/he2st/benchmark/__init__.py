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

from he2st._utils import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
