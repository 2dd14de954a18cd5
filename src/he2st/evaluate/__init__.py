"""Evaluation: metrics, clustering agreement, leak-free splits, the per-fold protocol, run results.

::

    from he2st.evaluate import evaluate_slide, make_splits
    folds = make_splits("loso", cohort)
    scores = evaluate_slide(observed, predicted, genes).as_dict()

Running a whole benchmark (every method on every fold, a run folder) is
:func:`he2st.benchmark.run_benchmark`; :func:`read_run` reads its folder.
"""

from __future__ import annotations

from he2st._utils import lazy_exports
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

# The protocol pulls in methods, encoders and pandas: import it on first use.
_LAZY = {
    "RunResult": "he2st.evaluate.results",
    "read_run": "he2st.evaluate.results",
    "cluster_agreement": "he2st.evaluate.clustering",
    "cluster_expression": "he2st.evaluate.clustering",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
