"""Exact search: chunked torch matrix products over a bank that may be memory-mapped."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from he2st.errors import He2stInputError
from he2st.retrieval.search.result import Index, exact_distances


class TorchExactIndex(Index):
    """Exact search by chunked matrix products (CPU or CUDA).

    The bank is read in chunks of ``bank_chunk`` rows, so it may be a
    read-only ``np.memmap`` larger than memory; a running top-k is merged
    chunk by chunk. Memory is ``O(query_chunk x bank_chunk)``.

    ``precision="bf16"`` (cosine and L2) scores in bfloat16 -- several times
    faster on CPUs with native bf16 -- to pick ``max(4 k, 200)`` candidates,
    which are then ranked by their exact float32 distances (a bank held in
    memory is converted once and kept as a bfloat16 copy).

    Parameters
    ----------
    embeddings
        ``(n, dim)`` bank (an array or a read-only ``np.memmap``).
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.
    device
        Torch device of the matrix products.
    query_chunk, bank_chunk
        Queries and bank rows scored at a time (bound the memory).
    precision
        ``"fp32"`` or ``"bf16"`` candidate scoring (cosine and L2 only).
    """

    kind = "exact"
    backend = "torch"

    def __init__(self, embeddings: Any, metric: str, *, device: str = "cpu", query_chunk: int = 2048,
                 bank_chunk: int = 32768, precision: str = "fp32") -> None:
        super().__init__(embeddings, metric)
        if precision not in ("fp32", "bf16"):
            raise He2stInputError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if precision == "bf16" and metric == "l1":
            raise He2stInputError("bf16 scoring is a matrix product: it serves cosine and l2, not l1")
        self.precision = precision
        self._bf16: Any = None
        self.device = device
        self.query_chunk = int(query_chunk)
        self.bank_chunk = int(bank_chunk)
        self._sq_norms: np.ndarray | None = None

    def _row_sq_norms(self) -> np.ndarray:
        # Squared norms of every bank row, computed once chunk by chunk.
        if self._sq_norms is None:
            out = np.empty(self.ntotal, dtype=np.float32)
            for s in range(0, self.ntotal, self.bank_chunk):
                block = np.asarray(self.embeddings[s : s + self.bank_chunk], dtype=np.float32)
                out[s : s + len(block)] = np.einsum("ij,ij->i", block, block)
            self._sq_norms = out
        return self._sq_norms

    def search_params(self) -> dict[str, Any]:
        return {"precision": self.precision}

    def _block(self, start: int, dev: Any) -> Any:
        import torch

        if self.precision == "bf16" and not isinstance(self.embeddings, np.memmap):
            if self._bf16 is None:
                self._bf16 = torch.cat([
                    torch.from_numpy(np.asarray(self.embeddings[s : s + self.bank_chunk], dtype=np.float32)).to(torch.bfloat16)
                    for s in range(0, self.ntotal, self.bank_chunk)
                ])
            return self._bf16[start : start + self.bank_chunk].to(dev)
        block = torch.from_numpy(np.array(self.embeddings[start : start + self.bank_chunk], dtype=np.float32)).to(dev)
        return block.to(torch.bfloat16) if self.precision == "bf16" else block

    def _search_ids(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
        if self.precision == "bf16":
            # bfloat16 picks the candidates, exact float32 distances rank them.
            kk = min(self.ntotal, max(4 * k, 200))
            cand = self._search_chunks(queries, kk, exclude)
            return _rerank(self.embeddings, queries, cand, k, self.metric)
        return self._search_chunks(queries, k, exclude)

    def _search_chunks(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
        import torch

        dev = torch.device(self.device)
        norms = torch.from_numpy(self._row_sq_norms()).to(dev)
        out = np.empty((len(queries), k), dtype=np.int64)
        excl = torch.from_numpy(exclude).to(dev) if exclude is not None else None
        with torch.no_grad():
            for qs in range(0, len(queries), self.query_chunk):
                q = torch.from_numpy(queries[qs : qs + self.query_chunk]).to(dev)
                if self.metric == "cosine":
                    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
                best_s = torch.full((len(q), k), -math.inf, device=dev)
                best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=dev)
                for bs in range(0, self.ntotal, self.bank_chunk):
                    block = self._block(bs, dev)
                    score = _rank_scores(q, block, norms[bs : bs + len(block)], self.metric)
                    if excl is not None:
                        score.masked_fill_(excl[bs : bs + len(block)][None, :], -math.inf)
                    kk = min(k, score.shape[1])
                    s_top, i_top = torch.topk(score, kk, dim=1)
                    best_s, best_i = _running_topk(best_s, best_i, s_top, i_top + bs)
                best_i[~torch.isfinite(best_s)] = -1
                out[qs : qs + len(q)] = best_i.cpu().numpy()
        return out


def _running_topk(best_s: Any, best_i: Any, new_s: Any, new_i: Any) -> tuple[Any, Any]:
    """Merge a block's candidates ``(n, m)`` into running top-k lists ``(n, k)`` (scores descending)."""
    import torch

    cat_s, cat_i = torch.cat([best_s, new_s], dim=1), torch.cat([best_i, new_i], dim=1)
    top_s, pos = torch.topk(cat_s, best_s.shape[1], dim=1)
    return top_s, torch.gather(cat_i, 1, pos)


def _rank_scores(q: Any, rows: Any, sq_norms: Any, metric: str) -> Any:
    """``(n_q, n_rows)`` scores, higher is nearer; monotone in the metric's distance for a fixed query.

    ``q`` is unit-norm for cosine; ``sq_norms`` are the rows' squared norms.
    """
    import torch

    if rows.dtype == torch.bfloat16:
        q = q.to(torch.bfloat16)
    if metric == "cosine":
        dots = (q @ rows.T).float()
        return dots / sq_norms.sqrt().clamp_min(1e-12)[None, :]
    if metric == "l2":
        # -(|b|^2 - 2 q.b): |q|^2 is constant per query and drops out of the ranking.
        return 2.0 * (q @ rows.T).float() - sq_norms[None, :]
    return -torch.cdist(q, rows, p=1.0)


def _rerank(bank: Any, queries: np.ndarray, cand: np.ndarray, k: int, metric: str, chunk: int = 256) -> np.ndarray:
    """The ``k`` candidates (-1 padded ids) with the smallest exact float32 distance, per query."""
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for s in range(0, len(queries), chunk):
        part = cand[s : s + chunk]
        rows = np.asarray(bank[np.maximum(part, 0).ravel()], dtype=np.float32).reshape(part.shape + (bank.shape[1],))
        d = np.where(part >= 0, exact_distances(queries[s : s + chunk], rows, metric), np.inf)
        best = np.argsort(d, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(part, best, axis=1)
        ids[~np.isfinite(np.take_along_axis(d, best, axis=1))] = -1
        out[s : s + chunk, : ids.shape[1]] = ids
    return out
