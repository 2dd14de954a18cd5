"""Start-up cost: ``import he2st`` and ``he2st --help`` wall time, which heavy modules they load,
and the wall time of ``he2st demo`` from an empty cache.

Each measurement runs in a fresh interpreter (best of ``--reps``); writes
``benchmarks/results/bench_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ["torch", "scanpy", "anndata", "pandas", "matplotlib", "sklearn"]
PROBE = "import sys, {mod}; print(','.join(m for m in {heavy!r} if m in sys.modules))"


def _best(cmd: list[str], reps: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(reps):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        best = min(best, time.perf_counter() - t0)
        out = res.stdout.strip()
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    baseline, _ = _best([sys.executable, "-c", "pass"], args.reps)
    imp, loaded = _best([sys.executable, "-c", PROBE.format(mod="he2st", heavy=HEAVY)], args.reps)
    cli_mod, cli_loaded = _best([sys.executable, "-c", PROBE.format(mod="he2st.cli", heavy=HEAVY)], args.reps)
    helptime, _ = _best([sys.executable, "-c", "from he2st.cli import main; import sys; sys.argv=['he2st','--help']; main()"], args.reps)
    with tempfile.TemporaryDirectory() as tmp:
        # Fresh cache and run folder: the demo builds its synthetic cohort from scratch.
        env = {**os.environ, "HE2ST_CACHE": str(Path(tmp) / "cache"), "HE2ST_QUIET": "1"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from he2st.cli import main; main()", "demo", "--out", str(Path(tmp) / "demo")],
                       capture_output=True, env=env, check=True)
        demo_s = time.perf_counter() - t0
    result = {
        "he2st_demo_cold_s": round(demo_s, 2),
        "python_startup_s": round(baseline, 4),
        "import_he2st_s": round(imp, 4),
        "import_he2st_extra_s": round(imp - baseline, 4),
        "import_he2st_heavy_modules": [m for m in loaded.split(",") if m],
        "import_he2st_cli_s": round(cli_mod, 4),
        "import_he2st_cli_heavy_modules": [m for m in cli_loaded.split(",") if m],
        "he2st_help_s": round(helptime, 4),
        "reps": args.reps,
    }
    out = Path(__file__).resolve().parent / "results" / "bench_startup.json"
    from he2st._utils import atomic_write_json

    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
