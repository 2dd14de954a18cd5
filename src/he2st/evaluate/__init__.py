"""Evaluation: metrics, leak-free splits, the benchmark protocol and runner.

::

    from he2st.evaluate import evaluate_slide, make_splits, run_benchmark
    folds = make_splits("loso", cohort)
    result = run_benchmark({"data": "synthetic", "methods": ["mean", "ridge"], "out": "run/"})
"""

from __future__ import annotations

import importlib
from typing import Any

from he2st.evaluate.metrics import (
    SlideEvaluation,
    evaluate_slide,
    gene_sets,
    paired_wilcoxon,
    pearson_per_gene,
    summarize,
    top_genes,
    wilcoxon_table,
)
from he2st.evaluate.splits import (
    Fold,
    SplitError,
    kfold_by_slide,
    leave_one_patient_out,
    leave_one_slide_out,
    make_splits,
    named_split,
    nested_leave_one_out,
)

# The runner pulls in methods, encoders and anndata I/O: import it on first use.
_LAZY = {
    "BenchmarkConfig": "he2st.evaluate.runner",
    "RunResult": "he2st.evaluate.runner",
    "run_benchmark": "he2st.evaluate.runner",
    "load_config": "he2st.evaluate.runner",
    "FoldOutcome": "he2st.evaluate.protocol",
    "run_fold": "he2st.evaluate.protocol",
    "choose_panel": "he2st.evaluate.protocol",
}

__all__ = [
    "Fold",
    "SlideEvaluation",
    "SplitError",
    "evaluate_slide",
    "gene_sets",
    "kfold_by_slide",
    "leave_one_patient_out",
    "leave_one_slide_out",
    "make_splits",
    "named_split",
    "nested_leave_one_out",
    "paired_wilcoxon",
    "pearson_per_gene",
    "summarize",
    "top_genes",
    "wilcoxon_table",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'he2st.evaluate' has no attribute {name!r}")
