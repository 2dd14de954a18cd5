"""Spot hypergraphs and hypergraph convolution (HGGEP's hypergraph association module).

Hyperedges follow the authors' rule (``build_adj_hypergraph`` in HGGEP's
code): every spot ``i`` scores every spot ``j`` by

``s_ij = a_ij / sum_j a_ij + ||f_i - f_j|| / sum_j ||f_i - f_j||``

(``a`` the spot graph's adjacency, ``f`` the spot features) and picks the
``k + 1`` spots of highest score. Both terms are row-normalised, so on a
slide of more than a handful of spots the adjacency term (about ``1 /
degree``) dominates: the picks are the graph neighbours of ``i``, the most
dissimilar in feature space first, topped up with the most dissimilar other
spots when ``i`` has fewer than ``k + 1`` neighbours. As in the authors' code
the pair ``(i, j)`` enters the incidence as node ``i`` of hyperedge ``j``:
hyperedge ``j`` gathers the spots that picked ``j``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["HypergraphResidual", "spot_hyperedges"]


@torch.no_grad()
def spot_hyperedges(features: torch.Tensor, edge_index: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Hyperedge index ``(2, n * min(k + 1, n))`` of the spots (row 0 node, row 1 hyperedge).

    Ties are broken towards the lower spot index. A spot without graph
    neighbours has a zero adjacency term (the authors' code divides by zero
    there), likewise the distance term of a slide of identical features.
    Distances are computed ``chunk`` rows at a time (memory ``chunk x n``).

    Parameters
    ----------
    features
        ``(n, d)`` spot features (used without gradient).
    edge_index
        ``(2, E)`` spot graph, row 0 the neighbour ``j``, row 1 the spot
        ``i`` (:func:`he2st.methods.nn.graphs.knn_graph`'s convention): ``a_ij = 1``.
    k
        Each spot picks ``k + 1`` spots (the authors' 3, so 4).
    chunk
        Rows of the distance matrix held at once.

    Returns
    -------
    torch.Tensor
        int64 ``(2, n * m)``, ``m = min(k + 1, n)``: ``[i, j]`` columns for
        every spot ``i`` and each of its picks ``j``, in pick order.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    import numpy as np

    f = features.detach().double().cpu().numpy()
    n = f.shape[0]
    m = min(k + 1, n)
    src = edge_index[0].cpu().numpy().astype(np.int64)
    dst = edge_index[1].cpu().numpy().astype(np.int64)
    degree = np.bincount(dst, minlength=n).astype(np.float64)
    picks = np.empty((n, m), dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = f[start:stop]
        sq = (block**2).sum(1)[:, None] + (f**2).sum(1)[None, :] - 2.0 * block @ f.T
        dist = np.sqrt(np.maximum(sq, 0.0))
        dist[np.arange(stop - start), np.arange(start, stop)] = 0.0
        total = dist.sum(axis=1, keepdims=True)
        score = np.divide(dist, total, out=np.zeros_like(dist), where=total > 0)
        sel = (dst >= start) & (dst < stop)
        np.add.at(score, (dst[sel] - start, src[sel]), 1.0 / degree[dst[sel]])
        picks[start:stop] = np.argsort(-score, axis=1, kind="stable")[:, :m]
    nodes = np.repeat(np.arange(n), m)
    out = torch.from_numpy(np.stack([nodes, picks.reshape(-1)]))
    return out.to(features.device)


class HypergraphResidual(nn.Module):
    """Two hypergraph convolutions with a residual: ``x + conv2(dropout(LN(relu(conv1 x))))``.

    HGGEP's hypergraph neural network (torch-geometric ``HypergraphConv``,
    unit hyperedge weights): ``dim -> hidden -> dim``.

    Parameters
    ----------
    dim
        Width in and out (1,024).
    hidden
        Width between the convolutions (512).
    dropout
        Dropout after the LayerNorm (0.5), in training only.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.5) -> None:
        super().__init__()
        from torch_geometric.nn import HypergraphConv

        self.conv1 = HypergraphConv(dim, hidden)
        self.conv2 = HypergraphConv(hidden, dim)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor, hyperedge_index: torch.Tensor) -> torch.Tensor:
        """``(n, dim)`` spot features and a ``(2, nnz)`` hyperedge index -> ``(n, dim)``.

        Parameters
        ----------
        x
            ``(n, dim)`` node features.
        hyperedge_index
            ``(2, nnz)`` incidence (row 0 node, row 1 hyperedge).

        Returns
        -------
        torch.Tensor
            ``(n, dim)`` features after the two convolutions, plus ``x``.
        """
        h = self.norm(F.relu(self.conv1(x, hyperedge_index)))
        h = F.dropout(h, self.dropout, training=self.training)
        return self.conv2(h, hyperedge_index) + x
