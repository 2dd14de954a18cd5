"""Provenance of a run folder: ``config.json`` with the resolved configuration, folds,
cohort, seeds, package versions and git commit; checked on every resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from he2st._utils import atomic_write_json
from he2st.benchmark.config import BenchmarkConfig, RunConfigError
from he2st.evaluate.results import CONFIG_FILE
from he2st.evaluate.splits import Fold

#: Version of the run-folder layout recorded in ``config.json``.
RUN_VERSION = 1


def check_or_write_config(out: Path, config: BenchmarkConfig, folds: list[Fold], cohort: Any) -> None:
    """Write config.json, or check that an existing run used the same configuration.

    A new ``config.json`` records the resolved configuration, its fingerprint,
    the method specs, the folds, the cohort, the seeds, package versions and the
    git commit. When one exists with the same fingerprint and folds, the methods
    of this invocation are added to it.

    Parameters
    ----------
    out
        The run folder.
    config
        The run's configuration.
    folds
        The folds of the run.
    cohort
        The cohort (its name, slide ids, patients and spot counts are recorded).

    Raises
    ------
    RunConfigError
        When the existing ``config.json`` is not valid JSON, or records other
        run-wide settings (see :meth:`BenchmarkConfig.fingerprint`) or other folds.
    """
    fp = config.fingerprint()
    fold_list = [f.to_dict() for f in folds]
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunConfigError(f"{path} is not valid JSON; remove the run folder or pick another --out") from None
        if old.get("fingerprint") != fp or old.get("folds") != fold_list:
            changed = sorted(k for k in set(fp) | set(old.get("fingerprint", {})) if fp.get(k) != old.get("fingerprint", {}).get(k))
            raise RunConfigError(
                f"run folder {out} holds a run with a different configuration "
                f"(differs in {changed or ['folds']}); use another --out, or delete the folder to start over"
            )
        # Same run-wide settings: record the methods of this invocation (others may be added later).
        methods = {m["label"]: m for m in old.get("methods", [])}
        methods.update({s.label: s.record() for s in config.method_specs()})
        old.update(config=config.to_dict(), methods=list(methods.values()), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(path, old)
        return
    record = {
        "he2st_run": RUN_VERSION,
        "config": config.to_dict(),
        "fingerprint": fp,
        "methods": [s.record() for s in config.method_specs()],
        "folds": fold_list,
        "cohort": {
            "name": getattr(cohort, "name", ""),
            "slides": list(cohort.slide_ids),
            "patients": dict(cohort.patients),
            "n_spots": {s: int(cohort[s].n_obs) for s in cohort.slide_ids},
        },
        "seeds": {"methods": config.seed, "split": config.seed},
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
    }
    atomic_write_json(path, record)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("he2st", "numpy", "scipy", "scikit-learn", "pandas", "anndata", "torch", "timm", "scanpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    """Commit of the he2st source tree, when it is a git checkout (None otherwise)."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


