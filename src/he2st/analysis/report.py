"""A self-contained HTML report of a benchmark run folder.

:func:`write_report` reads the tables a run wrote (``metrics.csv``,
``per_gene.csv``, ``summary.csv``, ``wilcoxon.csv``, ``predictions/``) and writes
``report.html``: one file, figures inlined as base64 PNG, no scripts, no
network. It is made of sections, each a function ``RunResult -> str | None``
(HTML, or None to skip); later features add theirs with
:func:`register_section`::

    from he2st.analysis.report import register_section

    @register_section("calibration", order=60, title="Calibration")
    def _calibration(run):
        if not run.has_uncertainty():
            return None
        return "<p>...</p>"

Built-in sections (order): overview (10), summary (20), per-slide bars (30),
paired Wilcoxon tests (40), top genes (50), spot maps of the best genes (70); after
``he2st analyze``: gene-gene correlation (72), region detection (74), DE and enrichment (76).
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from he2st._utils import atomic_write_text
from he2st.errors import He2stInputError
from he2st.evaluate.results import RunResult, read_run

SectionFn = Callable[[RunResult], "str | None"]


@dataclass(frozen=True)
class Section:
    """A report section: ``render(run) -> html or None``; sorted by ``order``.

    Parameters
    ----------
    name
        Key of the section (its HTML id; what ``sections=`` selects).
    title
        Heading shown in the report.
    order
        Position in the report (lower first; ties by name).
    render
        ``RunResult -> str | None``: the section's HTML, or None to leave it out.
    """

    name: str
    title: str
    order: int
    render: SectionFn


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, order: int = 100, title: str | None = None) -> Callable[[SectionFn], SectionFn]:
    """Decorator adding a section to every report (replaces a section of the same name).

    Parameters
    ----------
    name
        Key of the section.
    order
        Position in the report (built-in sections use 10 to 70).
    title
        Heading (default: ``name`` with ``_`` as spaces, capitalised).

    Returns
    -------
    Callable
        The decorator; it registers the function and returns it unchanged.
    """

    def deco(fn: SectionFn) -> SectionFn:
        _SECTIONS[name] = Section(name, title or name.replace("_", " ").capitalize(), order, fn)
        return fn

    return deco


def list_sections() -> list[str]:
    """Registered section names, in report order.

    Returns
    -------
    list of str
    """
    return [s.name for s in sorted(_SECTIONS.values(), key=lambda s: (s.order, s.name))]


def render_report(run: RunResult, sections: list[str] | None = None) -> str:
    """The report HTML of a loaded run (all registered sections, or those named).

    A section that raises is replaced by an error paragraph; the rest of the
    report is still written.

    Parameters
    ----------
    run
        The loaded run.
    sections
        Names of the sections to include (None: all), rendered in report order.

    Returns
    -------
    str
        A complete, self-contained HTML page.

    Raises
    ------
    He2stInputError
        ``sections`` names an unregistered section.
    """
    chosen = sorted(_SECTIONS.values(), key=lambda s: (s.order, s.name))
    if sections is not None:
        unknown = [s for s in sections if s not in _SECTIONS]
        if unknown:
            raise He2stInputError(f"unknown report section(s) {unknown}; available: {list_sections()}")
        chosen = [s for s in chosen if s.name in sections]
    body = []
    for sec in chosen:
        try:
            content = sec.render(run)
        except Exception as exc:  # a broken optional section must not lose the rest of the report
            content = f'<p class="err">section failed: {html.escape(type(exc).__name__)}: {html.escape(str(exc))}</p>'
        if content:
            body.append(f'<section id="{html.escape(sec.name)}"><h2>{html.escape(sec.title)}</h2>\n{content}\n</section>')
    name = run.config.get("config", {}).get("name") or run.out.name
    return _PAGE.format(
        title=html.escape(f"he2st benchmark: {name}"),
        style=_STYLE,
        body="\n".join(body),
        generated=html.escape(time.strftime("%Y-%m-%d %H:%M")),
    )


def write_report(out: str | os.PathLike, sections: list[str] | None = None, path: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (atomically) for a run folder and return its path.

    Parameters
    ----------
    out
        The run folder.
    sections
        As in :func:`render_report`.
    path
        Where to write the report (default ``<out>/report.html``).

    Returns
    -------
    pathlib.Path
        The report file.
    """
    run = read_run(out)
    target = Path(path) if path is not None else run.out / "report.html"
    atomic_write_text(target, render_report(run, sections))
    return target


# -- built-in sections -----------------------------------------------------------------------


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


@register_section("overview", order=10, title="Run")
def _overview(run: RunResult) -> str:
    cfg = run.config.get("config", {})
    cohort = run.config.get("cohort", {})
    rows = [
        ("data", str(cfg.get("data", ""))),
        ("slides", ", ".join(cohort.get("slides", []))),
        ("split", f"{cfg.get('split', '')} ({len(run.config.get('folds', []))} folds)"),
        ("methods", ", ".join(run.methods)),
        ("gene panel", f"{cfg.get('genes', '')} (chosen on each fold's training slides only)"),
        ("seed", str(cfg.get("seed", ""))),
        ("he2st", str(run.config.get("versions", {}).get("he2st", ""))),
        ("git commit", str(run.config.get("git_commit") or "n/a")),
    ]
    panels = {}
    for rec in run.folds:
        panels.setdefault(rec["method"], []).append(len(rec["panel"]["genes"]))
    if panels:
        sizes = sorted({n for v in panels.values() for n in v})
        rows.append(("panel size per fold", ", ".join(map(str, sizes))))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{table}</table>' + _p(
        "PCC: Pearson r between predicted and observed expression of a gene over the spots of a test slide, "
        "averaged over all panel genes (ACG), the 50 genes with the highest mean observed expression (HEG) "
        "or the highest observed variance (HVG) of that slide. Genes constant in the observed or predicted "
        "values have no PCC; they are excluded and counted (n_nan). Values are mean (sd) over test slides."
    )


@register_section("summary", order=20, title="Summary")
def _summary(run: RunResult) -> str:
    from he2st.analysis.figures import table_html

    s = run.summary
    order = [
        ("pcc", "ACG"), ("pcc", "HEG"), ("pcc", "HVG"), ("pcc", "HVG10"), ("pcc", "SVG"), ("pcc", "markers"),
        ("mse", "ACG"), ("mae", "ACG"), ("rmse", "ACG"), ("spearman", "ACG"), ("nrmse", "ACG"), ("auc", "ACG"),
        ("jsd", "ACG"), ("ssim", "ACG"), ("mi", "ACG"), ("svg_recovery", "SVG"), ("ari", "ACG"), ("nmi", "ACG"),
    ]
    cols = [(m, g) for m, g in order if ((s["metric"] == m) & (s["gene_set"] == g)).any()]
    idx = s.set_index(["method", "metric", "gene_set"])
    rows = []
    for method in run.methods:
        row: dict[str, Any] = {"method": method}
        for m, g in cols:
            key = (method, m, g)
            name = m.upper() if m in ("ari", "nmi") else f"{m.upper()}({g})"
            if key not in idx.index:
                row[name] = "n/a"
                continue
            r = idx.loc[key]
            cell = "n/a" if pd.isna(r["mean"]) else f"{r['mean']:.3f}" + ("" if pd.isna(r["sd"]) else f" ({r['sd']:.3f})")
            if m == "pcc" and "n_nan" in r and r["n_nan"] > 0:
                cell += f" [n_nan={int(r['n_nan'])}]"
            row[name] = cell
        rows.append(row)
    return table_html(pd.DataFrame(rows)) + _p(
        "[n_nan=k]: genes x slides whose PCC was undefined (constant values) and left out of the mean. "
        "The mean baseline predicts a constant, so its PCC is undefined everywhere."
    )


@register_section("per_slide", order=30, title="Per test slide")
def _per_slide(run: RunResult) -> str | None:
    from he2st.analysis.figures import figure_html, per_slide_bars

    parts = []
    for gs in ("ACG", "HEG"):
        if ((run.metrics["metric"] == "pcc") & (run.metrics["gene_set"] == gs)).any():
            parts.append(figure_html(per_slide_bars(run.metrics, "pcc", gs, run.methods), alt=f"PCC({gs}) per slide"))
    return "\n".join(parts) or None


@register_section("wilcoxon", order=40, title="Paired Wilcoxon signed-rank tests (over test slides)")
def _wilcoxon(run: RunResult) -> str | None:
    from he2st.analysis.figures import table_html

    if run.wilcoxon.empty:
        return _p("Only one method: nothing to compare.") + _no_pcc_note(run)
    w = run.wilcoxon[run.wilcoxon["n"] > 0] if "n" in run.wilcoxon else run.wilcoxon  # no usable pair: no test
    return table_html(w) + _p(
        "Two-sided test of the per-slide difference a - b; median_difference > 0 favours a for PCC, "
        "< 0 favours a for MSE. "
        "With 5 or fewer non-zero differences the exact p-value cannot fall below 0.0625."
    ) + _no_pcc_note(run)


def _no_pcc_methods(run: RunResult) -> list[str]:
    """Methods whose PCC(ACG) is undefined on every test slide (a constant prediction)."""
    m = run.metrics
    if m.empty or "metric" not in m:
        return []
    pcc = m[(m["metric"] == "pcc") & (m["gene_set"] == "ACG")]
    defined = pcc.groupby("method", observed=True)["value"].apply(lambda v: v.notna().any())
    return [str(k) for k, ok in defined.items() if not ok]


def _no_pcc_note(run: RunResult) -> str:
    """One sentence on the methods left out of the PCC tables, or nothing."""
    names = _no_pcc_methods(run)
    if not names:
        return ""
    return _p(
        f"{', '.join(names)}: no PCC (nor rank-based metric) on any slide, because the prediction is constant "
        "over the spots (the mean baseline predicts the training mean everywhere), so a correlation is undefined; "
        "left out of these tests and of the best-predicted genes. Its errors (MSE, MAE, RMSE) are in the summary."
    )


@register_section("top_genes", order=50, title="Best-predicted genes")
def _top_genes(run: RunResult) -> str | None:
    from he2st.analysis.figures import table_html

    if run.top_genes.empty:
        return None
    t = run.top_genes[run.top_genes["rank"] <= 10]
    t = t[t["n_slides"] > 0] if "n_slides" in t else t  # folders written before undefined rows were dropped
    return table_html(t) + _p("Ranked by mean -log10 p of the per-slide Pearson test over test slides.")


@register_section("calibration", order=60, title="Calibration of predicted uncertainty")
def _calibration(run: RunResult) -> str | None:
    from he2st.analysis.calibration import calibration_section

    return calibration_section(run)


@register_section("spot_maps", order=70, title="Observed vs predicted: each method's best genes")
def _spot_maps(run: RunResult, n_genes: int = 2, max_methods: int = 12) -> str | None:
    """For each method (by mean PCC(ACG), at most ``max_methods``): its top genes, each on its median slide."""
    s = run.summary[(run.summary["metric"] == "pcc") & (run.summary["gene_set"] == "ACG")].dropna(subset=["mean"])
    if s.empty:
        return None
    methods = [str(m) for m in s.sort_values("mean", ascending=False, kind="stable")["method"]]
    parts = [_p(f"For each method (best mean PCC(ACG) first; at most {max_methods}), the {n_genes} genes with its "
                "highest mean PCC over test slides; each shown on the test slide where that gene's PCC is the "
                "median over slides (not the best one). Methods without a defined PCC (a constant prediction) "
                "are not shown.")]
    shown = 0
    for method in methods[:max_methods]:
        maps = _method_gene_maps(run, method, n_genes)
        if maps:
            parts.append(f"<h3>{html.escape(method)}</h3>")
            parts.extend(maps)
            shown += 1
    return "\n".join(parts) if shown else None


def _method_gene_maps(run: RunResult, method: str, n_genes: int) -> list[str]:
    """Observed/predicted map pairs of ``method``'s ``n_genes`` best genes (empty without predictions)."""
    import anndata as ad

    from he2st.analysis.figures import figure_html, spot_map_pair

    files = run.prediction_files(method)
    pg = run.per_gene[(run.per_gene["method"] == method)].dropna(subset=["pcc"])
    if not files or pg.empty:
        return []
    genes = pg.groupby("gene")["pcc"].mean().sort_values(ascending=False, kind="stable").index[:n_genes]
    out = []
    for gene in genes:
        rows = pg[pg["gene"] == gene].sort_values("pcc", kind="stable")
        row = rows.iloc[(len(rows) - 1) // 2]
        key = str(row["test_slide"])
        path = files.get((str(row["fold"]), key))
        if path is None:
            continue
        a = ad.read_h5ad(path)
        j = list(a.var_names).index(gene)
        fig = spot_map_pair(
            a.obsm["spatial"], a.layers["observed"][:, j], np.asarray(a.X)[:, j],
            title=f"{method}: {gene} on {key} (PCC {row['pcc']:.3f})",
        )
        out.append(figure_html(fig, alt=f"{method}: {gene} on {key}"))
    return out


def _analyses(run: RunResult, table: str) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """The analyses of ``he2st analyze`` and one of their tables, or None when the run has not got it."""
    from he2st.analysis.analyses import read_analyses

    res = read_analyses(run.out)
    df = res.get(table)
    if df is None or df.empty:
        return None
    return res, df


def _first_slide_files(run: RunResult, methods: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The first test slide (by name) predicted by the methods, and their prediction files of it."""
    files = {m: {s: p for (_, s), p in run.prediction_files(m).items()} for m in methods}
    slides = sorted(set().union(*[set(f) for f in files.values()])) if files else []
    if not slides:
        return None
    slide = slides[0]
    return slide, {m: f[slide] for m, f in files.items() if slide in f}


@register_section("gene_gene", order=72, title="Gene-gene correlation: observed vs predicted")
def _gene_gene(run: RunResult) -> str | None:
    import anndata as ad

    from he2st.analysis.analyses import gene_gene_correlation
    from he2st.analysis.figures import correlation_heatmaps, figure_html, table_html

    got = _analyses(run, "gene_gene")
    if got is None:
        return None
    res, gg = got
    n_top = int(res["params"].get("n_top", 50))
    tab = gg.pivot_table(index="method", columns="kind", values="r", aggfunc="mean", dropna=False).reset_index()
    parts = [table_html(tab), _p(
        f"r: Pearson correlation between the upper triangles of the observed and the predicted gene-gene correlation "
        f"matrices of the top-{n_top} HEG / HVG of each test slide (mean over slides; n/a: a constant prediction).")]
    first = _first_slide_files(run, [m for m in run.methods if m in set(gg["method"])])
    if first is None:
        return "\n".join(parts)
    slide, files = first
    preds = {m: ad.read_h5ad(p) for m, p in files.items()}
    for kind in ("HEG", "HVG"):
        mats: dict[str, pd.DataFrame] = {}
        for m, a in preds.items():
            g = gene_gene_correlation(None, a, n_top=n_top, kind=kind)
            mats.setdefault("observed", g.observed)
            if not np.isfinite(np.asarray(g.predicted, dtype=float)).any():
                continue  # a constant prediction has no gene-gene correlation: no empty panel
            mats[m] = g.predicted.loc[mats["observed"].index, mats["observed"].columns]
        parts.append(figure_html(correlation_heatmaps(mats, title=f"{kind} of {slide} (order: clustering of observed)"),
                                 alt=f"gene-gene correlation {kind} {slide}"))
    return "\n".join(parts)


@register_section("regions", order=74, title="Spatial region detection")
def _regions(run: RunResult) -> str | None:
    import anndata as ad

    from he2st.analysis.figures import figure_html, label_maps, table_html

    got = _analyses(run, "regions")
    if got is None:
        return None
    res, reg = got
    cols = [c for c in ("ari", "nmi", "ari_observed", "nmi_observed") if c in reg]
    tab = reg.groupby(["method", "clustering", "reference"], sort=False)[cols].mean().reset_index()
    parts = [table_html(tab), _p(
        "PCA + k-means (as mclSTExp, CMRCNet, SpaHGC) and Leiden (scanpy) on the predicted expression of each test "
        "slide; ARI/NMI against the region labels (reference 'labels') or, without labels, against the same clustering "
        "of the observed expression. ari_observed: the observed expression's own clusters against the labels.")]
    clus = res.get("clusters")
    first = _first_slide_files(run, [m for m in run.methods if m in set(reg["method"])])
    if clus is None or clus.empty or first is None:
        return "\n".join(parts)
    slide, files = first
    a = ad.read_h5ad(next(iter(files.values())))
    groupby = res["params"].get("groupby", "label")
    spots = [str(s) for s in a.obs_names]
    for algo in dict.fromkeys(clus["clustering"]):
        panels: dict[str, Any] = {}
        if groupby in a.obs:
            panels[groupby] = list(a.obs[groupby])
        sel = clus[(clus["test_slide"].astype(str) == slide) & (clus["clustering"] == algo)]
        for m in ["observed"] + list(files):
            c = sel[sel["method"] == m].set_index(sel[sel["method"] == m]["spot"].astype(str))["cluster"]
            if len(c):
                panels[m if m == "observed" else f"{m} (predicted)"] = list(c.reindex(spots))
        parts.append(figure_html(label_maps(a.obsm["spatial"], panels, title=f"{algo} clusters on {slide}"),
                                 alt=f"{algo} regions {slide}"))
    return "\n".join(parts)


@register_section("de", order=76, title="Differential expression and enrichment")
def _de(run: RunResult) -> str | None:
    from he2st.analysis.figures import table_html

    got = _analyses(run, "de_overlap")
    if got is None:
        return None
    res, ov = got
    p = res["params"]
    parts = [_p(f"Genes up in {p.get('groupby')} == {p.get('group')!r} against the other spots (scanpy "
                f"rank_genes_groups, Wilcoxon), from predicted and from observed expression; overlap of the two "
                f"top lists per test slide (n_top genes: at most {p.get('n_top')} and a fifth of the panel)."
                + (f" No list for {', '.join(p['de_skipped_constant'])}: a constant prediction ranks no gene."
                   if p.get("de_skipped_constant") else "")),
             table_html(ov.drop(columns=["genes"], errors="ignore"))]
    en = res.get("enrichment")
    if en is not None and not en.empty:
        top = en.sort_values(["test_slide", "method", "pvalue"], kind="stable").groupby(["test_slide", "method"], sort=False).head(5)
        parts += [_p("Over-representation of the user's gene sets (GMT) in each top list: one-sided Fisher exact test "
                     "(hypergeometric upper tail) within the panel, Benjamini-Hochberg padj per list; 5 best sets per list."),
                  table_html(top)]
    return "\n".join(parts)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table.tbl,table.kv{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.tbl th,table.tbl td,table.kv th,table.kv td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
table.kv th{text-align:left;background:#f6f6f6}table.kv td{text-align:left}
table.tbl th{background:#f6f6f6}p{font-size:.9em;color:#444}.err{color:#a00}
img{max-width:100%;margin:.3em 0}footer{margin-top:2em;font-size:.8em;color:#888}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>
<body><h1>{title}</h1>
{body}
<footer>Generated by he2st on {generated}. Self-contained: no scripts, no external resources.</footer>
</body></html>
"""
