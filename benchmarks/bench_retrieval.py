"""Retrieval engine benchmark: exact vs approximate top-50 search over 10k / 100k / 1M-row banks.

CMRCNet's authors name the method family's limit themselves: every query is
compared with every reference spot, so inference cost grows with the bank.
This script measures what :mod:`he2st.retrieval` does about it, in one run:

- ``exact-torch``: chunked torch matrix products (bank in RAM), the ground truth;
- ``exact-torch-mmap``: the same search streaming a memory-mapped bank from disk;
- ``exact-torch-bf16``: bfloat16 scores pick 200 candidates, float32 distances rank them;
- ``exact-faiss``: faiss flat index;
- ``ivf``: ``build_index(..., "ivf")``, faiss IVF-Flat over ``n / 64`` cells from he2st's
  two-level k-means, rows added pre-assigned; ``nprobe`` calibrated to recall@50 >= 0.95 on
  500 calibration queries (drawn from training sections, not the evaluation section);
- ``ivf-faiss``: the same with faiss' rule of thumb of ``4 sqrt(n)`` cells, calibrated the same way;
- ``hnsw``: faiss HNSW (M=32, efConstruction=64), ``efSearch`` calibrated the same
  way (only up to ``--hnsw-max`` rows, default 100k: on these cross-modal queries it needs
  ``efSearch`` in the thousands, see the results);

Embeddings are real: a BLEEP model (frozen ``efficientnet_lite0`` ImageNet features,
``--epochs`` epochs, other settings the paper's) trained on her2st C2-C6; the bank is
the expression embeddings of all 34 her2st sections (12,991 spots; the 29 count-only
sections enter through ``reference_slides``), the queries the image embeddings of the
910 C2-C6 spots. Larger banks add jittered copies of real rows (Gaussian noise whose
norm is on average half the median nearest-neighbour distance of the real rows), so
the neighbour structure stays that of the trained space. The 5,000 evaluation queries
come from section C2 only (its 187 real image embeddings + jittered copies); every
query an index may learn from (IVF/HNSW calibration) comes from C3-C6, as a
test slide is unseen by a fitted method. Cosine similarity (BLEEP's metric), k = 50.

Each (size, method) runs in its own process: time = wall clock of building the index
(incl. calibration) and of searching all queries; memory = peak RSS of the process
minus its RSS with the bank loaded (what the search itself needs); recall@50 against
``exact-torch``. Writes ``benchmarks/results/bench_retrieval.json``.

    python benchmarks/bench_retrieval.py [--sizes 10000,100000,1000000] [--threads 2] [--resume]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
K = 50
N_QUERIES = 5000
N_CALIBRATION = 500
TARGET_RECALL = 0.95
METHODS = ("exact-torch", "exact-torch-mmap", "exact-torch-bf16", "exact-faiss", "ivf", "ivf-faiss", "hnsw")


def _status_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak RSS of this process image; unlike ``ru_maxrss`` not inherited over exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# -- child: one (size, method) measurement ---------------------------------------------------


def child(work: Path, n: int, method: str, threads: int) -> dict:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    from he2st.retrieval import build_index, recall_at_k

    queries = np.load(work / "queries.npy")
    calib = np.load(work / "calibration.npy")
    if method == "exact-torch-mmap":
        bank = np.load(work / f"bank_{n}.npy", mmap_mode="r")
    else:
        bank = np.load(work / f"bank_{n}.npy")
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if method.startswith("exact"):
        index = build_index(bank, "cosine", "exact", backend="faiss" if method == "exact-faiss" else "torch",
                            precision="bf16" if method == "exact-torch-bf16" else "fp32")
    else:
        kind = "hnsw" if method == "hnsw" else "ivf"
        nlist = round(4 * math.sqrt(n)) if method == "ivf-faiss" else None  # None: n / 64 cells
        index = build_index(bank, "cosine", kind, k=K, target_recall=TARGET_RECALL, calibration_queries=calib,
                            nlist=nlist, seed=0)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    nb = index.search(queries, K)
    t_query = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    truth_file = work / f"truth_{n}.npy"
    if method == "exact-torch":
        np.save(truth_file, nb.indices)
    truth = np.load(truth_file)
    return {
        "n": n,
        "method": method,
        "build_s": round(t_build, 3),
        "query_s": round(t_query, 3),
        "queries_per_s": round(len(queries) / t_query, 1),
        "recall_at_50": round(recall_at_k(nb.indices, truth), 4),
        "extra_peak_mb": round(max(peak_kb - rss0, 0) / 1024, 1),
        "bank_mb": round(bank.nbytes / 2**20, 1),
        "index": index.describe(),
    }


# -- parent -----------------------------------------------------------------------------------


def real_embeddings(work: Path, epochs: int) -> dict:
    """Train BLEEP on her2st C2-C6 and return its expression (bank) and image (query) embeddings."""
    out = work / f"real_bleep_e{epochs}_v2.npz"
    if out.is_file():
        z = np.load(out)
        return {k: z[k] for k in z.files}
    import torch

    from he2st.datasets import her2st, her2st_panel
    from he2st.methods import create_method

    torch.manual_seed(0)
    imaged = her2st(sections=["C2", "C3", "C4", "C5", "C6"])
    ref = {"data": "her2st", "params": {"with_images_only": False}, "images": "without"}
    model = create_method("bleep", encoder="efficientnet_lite0", weights="imagenet", epochs=epochs,
                          reference_slides=ref).fit(list(imaged), her2st_panel())
    bank = np.asarray(model.bank_.embeddings, dtype=np.float32)
    queries = np.concatenate([model.image_embeddings(s) for s in imaged]).astype(np.float32)
    section = np.concatenate([[str(s.uns["he2st"]["slide_id"])] * s.n_obs for s in imaged])
    np.savez(out, bank=bank, queries=queries, section=section)
    return {"bank": bank, "queries": queries, "section": section}


def median_nn_distance(x: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Median Euclidean distance from a sample of rows to their nearest other row."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), size=min(sample, len(x)), replace=False)
    x64 = x.astype(np.float64)
    sq = (x64**2).sum(1)
    d2 = sq[rows, None] + sq[None, :] - 2.0 * x64[rows] @ x64.T
    d2[np.arange(len(rows)), rows] = np.inf
    return float(np.median(np.sqrt(np.maximum(d2.min(axis=1), 0.0))))


def geometry(bank: np.ndarray, queries: np.ndarray, sample: int = 1000, seed: int = 0) -> dict:
    """Cosine structure of the real embeddings: why cross-modal queries are hard for ANN indexes."""
    rng = np.random.default_rng(seed)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    qb = np.sort(q[rng.choice(len(q), min(sample, len(q)), replace=False)] @ b.T, axis=1)[:, ::-1]
    bb = np.sort(b[rng.choice(len(b), min(sample, len(b)), replace=False)] @ b.T, axis=1)[:, ::-1]
    return {
        "query_to_bank_cosine_median": {"top1": float(np.median(qb[:, 0])), "top50": float(np.median(qb[:, 49])),
                                        "median_row": float(np.median(qb[:, qb.shape[1] // 2]))},
        "bank_to_bank_cosine_median": {"top1_other": float(np.median(bb[:, 1])), "top50": float(np.median(bb[:, 50])),
                                       "median_row": float(np.median(bb[:, bb.shape[1] // 2]))},
    }


def jittered(real: np.ndarray, n: int, scale: float, seed: int, keep_real: bool = True) -> np.ndarray:
    """``n`` rows: the real ones first (if ``keep_real``), then noisy copies of random real rows."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    sigma = scale / np.sqrt(d)  # E||noise|| ~= scale
    n_real = min(len(real), n) if keep_real else 0
    out = np.empty((n, d), dtype=np.float32)
    out[:n_real] = real[:n_real]
    for s in range(n_real, n, 100_000):
        e = min(s + 100_000, n)
        src = rng.integers(0, len(real), e - s)
        out[s:e] = real[src] + rng.normal(0.0, sigma, size=(e - s, d)).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=100, help="BLEEP epochs for the real embeddings")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest bank indexed with HNSW")
    ap.add_argument("--work", default=None, help="scratch folder for banks (default: he2st cache)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows an interrupted run measured (same --work, threads and embeddings)")
    ap.add_argument("--child", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from he2st._utils import atomic_write_json, default_cache_dir

    work = Path(args.work) if args.work else default_cache_dir() / "bench_retrieval"
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(work, int(args.child[0]), args.child[1], args.threads)))
        return 0

    if not args.resume and (work / "rows").is_dir():
        shutil.rmtree(work / "rows")
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    t_all = time.perf_counter()
    real = real_embeddings(work, args.epochs)
    mnn_bank = median_nn_distance(real["bank"])
    mnn_q = median_nn_distance(real["queries"])
    is_test = real["section"] == "C2"
    test_real, train_real = real["queries"][is_test], real["queries"][~is_test]
    np.save(work / "queries.npy", jittered(test_real, N_QUERIES, 0.5 * mnn_q, seed=1))
    np.save(work / "calibration.npy", jittered(train_real, N_CALIBRATION, 0.5 * mnn_q, seed=4, keep_real=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "HE2ST_QUIET": "1"}

    rows = []
    for n in sizes:
        np.save(work / f"bank_{n}.npy", jittered(real["bank"], n, 0.5 * mnn_bank, seed=3))
        todo = ["exact-torch"] + [m for m in methods if m != "exact-torch"]
        for m in todo:
            if m == "hnsw" and n > args.hnsw_max:
                continue
            done = work / "rows" / f"{n}_{m}_t{args.threads}.json"
            if args.resume and done.is_file():
                rows.append(json.loads(done.read_text()))
                print(f"n={n:>8} {m:<17} (kept from the interrupted run)", flush=True)
                continue
            cmd = [sys.executable, __file__, "--child", str(n), m, "--threads", str(args.threads), "--work", str(work)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"child {n} {m} failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            atomic_write_json(done, row)
            print(f"n={n:>8} {m:<17} build {row['build_s']:8.2f}s  query {row['query_s']:8.2f}s  "
                  f"recall@50 {row['recall_at_50']:.4f}  +{row['extra_peak_mb']:7.1f} MB  {row['index']['params']}",
                  flush=True)
        (work / f"bank_{n}.npy").unlink()

    # Sizes not measured in this run keep their rows from the previous results (each size's
    # speed-ups still compare rows of one run only).
    out = HERE / "results" / "bench_retrieval.json"
    if out.is_file():
        rows = [r for r in json.loads(out.read_text())["results"] if r["n"] not in sizes] + rows
        rows.sort(key=lambda r: r["n"])
    for r in rows:
        base = next(x for x in rows if x["n"] == r["n"] and x["method"] == "exact-torch")
        r["speedup_vs_exact_torch"] = round(base["query_s"] / r["query_s"], 2)
    big = max(r["n"] for r in rows)
    goal = {}
    for r in rows:
        if r["n"] == big and not r["method"].startswith("exact"):
            goal[r["method"]] = {"n": big, "speedup": r["speedup_vs_exact_torch"], "recall_at_50": r["recall_at_50"],
                                 "met": bool(r["speedup_vs_exact_torch"] >= 10 and r["recall_at_50"] >= 0.95)}
    summary = {
        "benchmark": "bench_retrieval",
        "k": K,
        "n_queries": N_QUERIES,
        "metric": "cosine",
        "dim": int(real["bank"].shape[1]),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "embeddings": (f"BLEEP (frozen efficientnet_lite0 ImageNet features, {args.epochs} epochs) trained on her2st "
                       f"C2-C6: bank = expression embeddings of all 34 sections ({len(real['bank'])} real rows), "
                       f"queries = image embeddings of C2 ({int(is_test.sum())} real rows; indexes learn from "
                       f"C3-C6, {int((~is_test).sum())} real rows); jittered copies "
                       f"(noise norm ~0.5 x median NN distance: bank {mnn_bank:.3f}, queries {mnn_q:.3f})"),
        "geometry": geometry(real["bank"], real["queries"]),
        "target_recall": TARGET_RECALL,
        "goal_10x_at_recall_0.95_largest_bank": goal,
        "results": rows,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    atomic_write_json(out, summary)
    print(json.dumps(goal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
