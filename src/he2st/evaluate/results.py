"""The tables of a benchmark run folder, read in one place.

A run folder (written by :func:`he2st.benchmark.run_benchmark`) holds
``config.json``, one JSON record per finished (method, fold) pair under
``folds/``, and the CSV tables aggregated from them. :func:`read_run` loads all
of it into a :class:`RunResult`; the CLI, the report
(:mod:`he2st.analysis.report`) and notebooks use that one reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st.errors import He2stInputError

CONFIG_FILE = "config.json"
FOLDS_DIR = "folds"
PREDICTIONS_DIR = "predictions"

#: Columns of ``metrics.csv`` (long format) and ``per_gene.csv``, in file order.
METRICS_COLUMNS = ["method", "fold", "test_slide", "metric", "gene_set", "value", "n_genes", "n_nan"]
PER_GENE_COLUMNS = ["method", "fold", "test_slide", "gene", "pcc", "pvalue", "mse", "mean_observed", "var_observed"]

#: The (metric, gene set) columns of :meth:`RunResult.table` by default.
TABLE_METRICS: tuple[tuple[str, str], ...] = (("pcc", "ACG"), ("pcc", "HEG"), ("pcc", "HVG"), ("mse", "ACG"), ("mae", "ACG"))


@dataclass
class RunResult:
    """Tables of a finished (or partly finished) run.

    Built by :func:`read_run` (or returned by :func:`he2st.benchmark.run_benchmark`);
    each parameter is kept as the attribute of the same name.

    Parameters
    ----------
    out
        The run folder.
    metrics, per_gene, summary, wilcoxon, top_genes
        The CSV tables of the folder (empty frames for the optional ones).
    config
        ``config.json`` (resolved configuration, folds, cohort, versions).
    folds
        The per-(method, fold) JSON records under ``folds/``.
    folds_run, folds_skipped
        (method, fold) pairs run, and resumed from earlier invocations, by the
        call that produced this result (0 when read from disk).
    report
        ``report.html`` when it exists.
    """

    out: Path
    metrics: pd.DataFrame
    per_gene: pd.DataFrame
    summary: pd.DataFrame
    wilcoxon: pd.DataFrame
    top_genes: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    folds: list[dict[str, Any]] = field(default_factory=list)
    folds_run: int = 0
    folds_skipped: int = 0
    report: Path | None = None

    @property
    def methods(self) -> list[str]:
        """Method labels in the order of ``metrics.csv``."""
        return list(dict.fromkeys(self.metrics["method"]))

    def prediction_files(self, method: str) -> dict[tuple[str, str], Path]:
        """Prediction AnnData files of a method.

        Parameters
        ----------
        method
            Method label.

        Returns
        -------
        dict
            ``{(fold, test_slide): path}`` of the files that exist.
        """
        out: dict[tuple[str, str], Path] = {}
        for rec in self.folds:
            if rec["method"] != method:
                continue
            for slide, rel in zip(rec["fold"]["test"], rec.get("predictions", [])):
                if (self.out / rel).is_file():
                    out[(rec["fold"]["name"], slide)] = self.out / rel
        return out

    def has_uncertainty(self) -> bool:
        """Whether any prediction file holds ``layers["uncertainty"]``."""
        import anndata as ad

        for m in self.methods:
            for p in self.prediction_files(m).values():
                if "uncertainty" in ad.read_h5ad(p, backed="r").layers:
                    return True
        return False

    def table(self, metrics: Sequence[tuple[str, str]] = TABLE_METRICS) -> pd.DataFrame:
        """Method x metric table of the mean (and sd) over test slides.

        Parameters
        ----------
        metrics
            ``(metric, gene_set)`` pairs, e.g. ``("pcc", "HEG")``.

        Returns
        -------
        pandas.DataFrame
            One row per method; columns ``"PCC(HEG)"`` and ``"PCC(HEG) sd"`` etc.
        """
        s = self.summary.set_index(["method", "metric", "gene_set"])
        rows = {}
        for method in dict.fromkeys(self.summary["method"]):
            row = {}
            for metric, gs in metrics:
                key = (method, metric, gs)
                name = f"{metric.upper()}({gs})"
                row[name] = s.loc[key, "mean"] if key in s.index else np.nan
                row[f"{name} sd"] = s.loc[key, "sd"] if key in s.index else np.nan
            rows[method] = row
        return pd.DataFrame.from_dict(rows, orient="index")

    def random_weight_methods(self) -> set[str]:
        """Methods whose fold records say an image encoder started from random weights (``pretrained: false``).

        Returns
        -------
        set of str
            Method labels; read from ``folds/`` when :attr:`folds` is empty.
        """
        records = self.folds or (fold_records(self.out) if (Path(self.out) / FOLDS_DIR).is_dir() else [])
        return {str(d["method"]) for d in records if d.get("pretrained") is False}

    def format_table(self) -> str:
        """Printable summary: PCC(ACG/HEG/HVG), MSE and MAE per method, mean ± sd over test slides."""
        tab = self.table()
        cols = [c for c in tab.columns if not c.endswith(" sd")]
        random = self.random_weight_methods()
        lines = [f"{'method':<16}" + "".join(f"{c:>18}" for c in cols)]
        for method, row in tab.iterrows():
            cells = []
            for c in cols:
                m, s = row[c], row[f"{c} sd"]
                cells.append(f"{'n/a':>18}" if pd.isna(m) else f"{m:>10.3f} ± {0.0 if pd.isna(s) else s:<5.3f}")
            label = f"{method}*" if str(method) in random else str(method)
            lines.append(f"{label:<16}" + "".join(cells))
        lines.append(
            f"({self.folds_run} method x fold pairs run, {self.folds_skipped} resumed from {self.out}; "
            "mean ± sd over test slides; n/a: undefined, e.g. PCC of a constant prediction)"
        )
        if random:
            lines.append("* an image encoder started from random weights (fold records: pretrained: false)")
        if self.report is not None:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def fold_records(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished (method, fold) records of a run folder, in file-name order.

    Parameters
    ----------
    out
        Run folder.

    Returns
    -------
    list of dict
        One parsed ``folds/<method>/<fold>.json`` per finished pair, or, in a run
        with seeds, ``folds/<method>/seed<k>/<fold>.json`` per (method, fold,
        seed), whose record has a ``seed`` key.

    Raises
    ------
    He2stInputError
        A record is not valid JSON.
    """
    records = []
    root = Path(out) / FOLDS_DIR
    paths = [*root.glob("*/*.json"), *root.glob("*/seed*/*.json")]
    for p in sorted(paths, key=lambda q: q.relative_to(root).parts):
        # Hidden names are temporary files of interrupted writes, never results.
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise He2stInputError(f"{p}: not a valid result record ({exc}); delete it to rerun that fold") from None
    return records


def _optional_csv(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_run(out: str | os.PathLike) -> RunResult:
    """Load the tables, configuration and fold records of a run folder.

    Parameters
    ----------
    out
        A run folder written by :func:`he2st.benchmark.run_benchmark`.

    Returns
    -------
    RunResult
        Its tables; ``folds_run`` and ``folds_skipped`` are 0.

    Raises
    ------
    He2stInputError
        The folder lacks ``metrics.csv``, ``per_gene.csv`` or ``summary.csv``.
    """
    out = Path(out)
    need = ["metrics.csv", "per_gene.csv", "summary.csv"]
    missing = [n for n in need if not (out / n).is_file()]
    if missing:
        raise He2stInputError(f"run folder {out} lacks {missing}: is the run finished? (run the benchmark first)")
    config = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else {}
    report = out / "report.html"
    return RunResult(
        out=out,
        metrics=pd.read_csv(out / "metrics.csv"),
        per_gene=pd.read_csv(out / "per_gene.csv"),
        summary=pd.read_csv(out / "summary.csv"),
        wilcoxon=_optional_csv(out / "wilcoxon.csv"),
        top_genes=_optional_csv(out / "top_genes.csv"),
        config=config,
        folds=fold_records(out),
        report=report if report.is_file() else None,
    )


__all__ = [
    "CONFIG_FILE",
    "FOLDS_DIR",
    "METRICS_COLUMNS",
    "PER_GENE_COLUMNS",
    "PREDICTIONS_DIR",
    "RunResult",
    "fold_records",
    "read_run",
]
