"""Heterogeneous exemplar graphs: target spots joined to reference spots of other slides.

SpaHGC (Shi et al. 2026, seed paper 003) and EGGN (Yang et al., Pattern
Recognition 2024) predict a slide's spots ("target" nodes) from a graph that
also holds reference spots ("reference" nodes) retrieved from the training
slides, whose expression is known. This module holds what both share:

- :func:`exemplar_graph`: the :class:`torch_geometric.data.HeteroData` with
  three edge types, each switchable:

  ``TS = ("target", "near", "target")``
      target-target spatial edges: each spot receives edges from its ``q``
      nearest spots by Euclidean distance of pixel centres (SpaHGC eq. 2-4);
  ``CS = ("reference", "refer", "target")``
      cross-slide edges: each target receives edges from the reference spots
      retrieved for it (top-K of the bank search by image embedding; SpaHGC
      eq. 5-6); the reference nodes are the UNIQUE retrieved bank rows, so a
      bank spot retrieved by several targets is one node;
  ``RS = ("reference", "close", "reference")``
      reference-reference edges: each reference node receives edges from its
      ``rs_k`` most similar reference nodes by the joint feature
      ``[image embedding || expression]`` (SpaHGC eq. 7-8).

  Edge lists follow torch-geometric: row 0 is the source (sender), row 1 the
  receiver.
- :func:`feature_masks`: SpaHGC's complementary (or random) feature masking
  that makes two views of a graph.
- :class:`CrossNodeDualAttention` (CNDA, SpaHGC sec. 3.4) and
  :class:`CrossNodeAttentionPool` (CNAP, sec. 3.5): edge-wise multi-head
  attention between targets and their references.
- :class:`GraphExemplarBridging` (GEB) and :class:`ExemplarAttentionHead`:
  EGGN's gated window-exemplar messages and its exemplar-pooling head.
- :class:`NodeInputs`: the input projections of both node types.
- :class:`HeteroLayer`: one message-passing layer, GraphSAGE per same-type
  relation (torch-geometric ``HeteroConv``) plus a cross-type module on
  ``CS`` (CNDA or GEB), outputs of a node type averaged over its relations;
  :class:`HeteroEncoder` stacks them after the input projections.

Node types with no incoming relation in a layer (every edge type switched off
for them) keep their input representation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from he2st.errors import He2stInputError

TARGET, REFERENCE = "target", "reference"
TS = (TARGET, "near", TARGET)
CS = (REFERENCE, "refer", TARGET)
RS = (REFERENCE, "close", REFERENCE)
#: Switch name -> edge type.
EDGE_TYPES: dict[str, tuple[str, str, str]] = {"ts": TS, "cs": CS, "rs": RS}
MASKINGS = ("complementary", "random", "none")

__all__ = [
    "CS",
    "EDGE_TYPES",
    "MASKINGS",
    "RS",
    "TS",
    "CrossNodeAttentionPool",
    "CrossNodeDualAttention",
    "ExemplarAttentionHead",
    "GraphExemplarBridging",
    "HeteroEncoder",
    "HeteroLayer",
    "NodeInputs",
    "edge_softmax_sum",
    "exemplar_graph",
    "feature_masks",
    "similarity_graph",
]


# -- graph construction ----------------------------------------------------------------------


def check_edges(edges: Sequence[str]) -> tuple[str, ...]:
    """Validate an edge-type switch list (``"ts"``, ``"cs"``, ``"rs"``)."""
    edges = tuple(str(e) for e in edges)
    unknown = sorted(set(edges) - set(EDGE_TYPES))
    if unknown:
        raise He2stInputError(f"unknown edge type(s) {unknown}; choose from {sorted(EDGE_TYPES)}")
    return edges


def similarity_graph(x: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Directed k-nearest-neighbour graph in feature space, ``(2, E)`` int64, no self loops.

    Each row receives edges from its ``k`` most similar OTHER rows (row 0 the
    neighbour, row 1 the node), exact search (:func:`he2st.retrieval.build_index`).

    Parameters
    ----------
    x
        ``(n, d)`` node features.
    k
        Neighbours per node; capped at ``n - 1``.
    metric
        ``"cosine"``, ``"l2"`` or ``"l1"``.

    Returns
    -------
    numpy.ndarray
        ``(2, E)`` int64 edge index.
    """
    from he2st.retrieval import build_index

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros((2, 0), np.int64)
    idx = build_index(x, metric, "exact").search(x, k + 1).indices
    src, dst = [], []
    for i, row in enumerate(idx):
        # The node itself is normally its own nearest row; with duplicated features it may
        # not come first, so drop it wherever it is and keep the first k others.
        others = [j for j in row if j != i and j >= 0][:k]
        src.extend(others)
        dst.extend([i] * len(others))
    return np.stack([np.asarray(src, np.int64), np.asarray(dst, np.int64)])


def exemplar_graph(
    target_xy: np.ndarray,
    target_x: np.ndarray,
    exemplars: np.ndarray,
    bank_x: Any,
    bank_y: Any,
    *,
    q: int = 5,
    rs_k: int = 3,
    rs_metric: str = "l2",
    edges: Sequence[str] = ("ts", "cs", "rs"),
    target_y: np.ndarray | None = None,
    ts_max_distance: float | None = None,
) -> Any:
    """The heterogeneous graph of one target slide and its retrieved reference spots.

    Parameters
    ----------
    target_xy
        ``(n, 2)`` spot centres of the target slide (any unit; only their
        distances matter).
    target_x
        ``(n, d)`` image embeddings of the target spots.
    exemplars
        ``(n, K)`` bank rows retrieved for each target spot (``-1``: none).
    bank_x, bank_y
        The bank's ``(m, d)`` image embeddings and ``(m, n_genes)`` expression;
        only the retrieved rows are read.
    q
        Spatial neighbours per target spot (``TS``).
    rs_k, rs_metric
        Similar reference nodes per reference node (``RS``) and their metric
        on ``[embedding || expression]``.
    edges
        Edge types to build (``"ts"``, ``"cs"``, ``"rs"``); the nodes are the
        same whichever are switched off.
    target_y
        ``(n, n_genes)`` targets of a training slide, stored as ``target.y``.
    ts_max_distance
        Drop ``TS`` edges longer than this (units of ``target_xy``; None: keep
        all ``q``). EGGN's window graph is the 8-neighbourhood on the spot
        lattice capped at 5 neighbours (``q=5``, ``sqrt(2)`` pitches).

    Returns
    -------
    torch_geometric.data.HeteroData
        ``target.x`` ``(n, d)``, ``reference.x`` ``(r, d + n_genes)``
        (``[embedding || expression]``), ``reference.rows`` (the bank rows of
        the ``r`` reference nodes, sorted), ``n_genes``, and the requested
        edge types.
    """
    from torch_geometric.data import HeteroData

    from he2st.methods.nn.graphs import knn_graph

    edges = check_edges(edges)
    target_x = np.asarray(target_x, dtype=np.float32)
    exemplars = np.asarray(exemplars, dtype=np.int64)
    n = len(target_x)
    if exemplars.ndim != 2 or len(exemplars) != n:
        raise He2stInputError(f"exemplars must be (n_targets={n}, K) bank rows, got shape {exemplars.shape}")
    if len(target_xy) != n:
        raise He2stInputError(f"{len(target_xy)} spot centres for {n} target embeddings")
    valid = exemplars >= 0
    rows, inverse = np.unique(exemplars[valid], return_inverse=True)
    ref_x = np.asarray(bank_x[rows], dtype=np.float32) if len(rows) else np.zeros((0, target_x.shape[1]), np.float32)
    n_genes = int(bank_y.shape[1])
    ref_y = np.asarray(bank_y[rows], dtype=np.float32) if len(rows) else np.zeros((0, n_genes), np.float32)
    joint = np.concatenate([ref_x, ref_y], axis=1)

    data = HeteroData()
    data[TARGET].x = torch.from_numpy(target_x)
    if target_y is not None:
        data[TARGET].y = torch.from_numpy(np.asarray(target_y, dtype=np.float32))
    data[REFERENCE].x = torch.from_numpy(joint)
    data[REFERENCE].rows = torch.from_numpy(rows.astype(np.int64))
    data.n_genes = n_genes
    if "ts" in edges:
        data[TS].edge_index = torch.from_numpy(
            knn_graph(np.asarray(target_xy, dtype=np.float64), int(q), max_distance=ts_max_distance)
        )
    if "cs" in edges:
        dst = np.repeat(np.arange(n, dtype=np.int64), exemplars.shape[1])[valid.ravel()]
        data[CS].edge_index = torch.from_numpy(np.stack([inverse.astype(np.int64), dst]))
    if "rs" in edges:
        data[RS].edge_index = torch.from_numpy(similarity_graph(joint, int(rs_k), rs_metric))
    return data


# -- masking ---------------------------------------------------------------------------------


def feature_masks(x: torch.Tensor, ratio: float, kind: str = "complementary",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two masked views of node features (SpaHGC sec. 3.3, eq. 9-10).

    ``"complementary"``: one uniform draw per entry; view 1 zeroes the entries
    drawn below ``ratio`` (it keeps ``1 - ratio`` of them), view 2 zeroes the
    others, so the two masks sum to one (``wenwenmin/SpaHGC`` model.py,
    ``augment_with_complement``). ``"random"``: two independent draws, each view
    zeroing ``ratio`` of its entries. ``"none"``: both views are ``x``.

    Parameters
    ----------
    x
        ``(n, d)`` node features.
    ratio
        Fraction of entries masked in view 1.
    kind
        ``"complementary"``, ``"random"`` or ``"none"``.
    generator
        Random generator (CPU), for reproducible masks.

    Returns
    -------
    tuple of torch.Tensor
        The two masked views, each shaped like ``x``.
    """
    if kind == "none":
        return x, x
    if kind not in MASKINGS:
        raise He2stInputError(f"masking must be one of {MASKINGS}, got {kind!r}")
    u = torch.rand(x.shape, generator=generator).to(x.device)
    masked = u < float(ratio)
    if kind == "complementary":
        return x.masked_fill(masked, 0.0), x.masked_fill(~masked, 0.0)
    u2 = torch.rand(x.shape, generator=generator).to(x.device)
    return x.masked_fill(masked, 0.0), x.masked_fill(u2 < float(ratio), 0.0)


# -- attention along edges -----------------------------------------------------------------------


def edge_softmax_sum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: torch.Tensor, n_groups: int,
                     heads: int, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Multi-head attention over the edges of each receiving node.

    Edge ``e`` has query ``q[e]``, key ``k[e]`` and value ``v[e]`` (rows already
    gathered from the nodes at its two ends). Its logit per head is
    ``q . k / sqrt(d / heads)`` through a LeakyReLU(0.2), normalised by a
    softmax over the edges of the same ``group`` (receiving node); the output
    of a node is the attention-weighted sum of its edges' values, heads
    concatenated. Nodes with no edge get zeros.

    Parameters
    ----------
    q, k, v
        ``(E, d)`` per-edge query, key and value.
    group
        ``(E,)`` receiving node of each edge.
    n_groups
        Number of receiving nodes.
    heads
        Attention heads (``d`` must divide by it).
    dropout, training
        Dropout on the attention weights (training only).

    Returns
    -------
    torch.Tensor
        ``(n_groups, d)``.
    """
    from torch_geometric.utils import scatter, softmax

    e, d = q.shape
    if d % heads:
        raise He2stInputError(f"attention width {d} is not divisible by {heads} heads")
    dh = d // heads
    logits = (q.view(e, heads, dh) * k.view(e, heads, dh)).sum(-1) / dh**0.5
    attn = softmax(F.leaky_relu(logits, 0.2), group, num_nodes=n_groups, dim=0)
    attn = F.dropout(attn, p=dropout, training=training)
    out = (attn.unsqueeze(-1) * v.view(e, heads, dh)).reshape(e, d)
    return scatter(out, group, dim=0, dim_size=n_groups, reduce="sum")


def _trunc_normal_linear(in_dim: int, out_dim: int) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    nn.init.trunc_normal_(lin.weight, std=0.02)
    nn.init.zeros_(lin.bias)
    return lin


class CrossNodeDualAttention(nn.Module):
    """CNDA: targets attend to their references and references to their targets (SpaHGC sec. 3.4).

    Along the ``CS`` edges (reference -> target): target queries against
    reference keys/values built from ``[reference state || LayerNorm(reference
    expression embedding)]`` (eq. 14-16, with the expression carried as in
    ``wenwenmin/SpaHGC`` CNDA.py), and the reverse, reference queries from that
    joint vector against target keys/values (eq. 17-19). Each direction is
    edge-wise multi-head attention (:func:`edge_softmax_sum`) followed by an
    output projection. Weights: truncated normal (sd 0.02), zero biases.

    Parameters
    ----------
    dim
        Width of the node states and of the expression embedding.
    heads
        Attention heads (4 in the authors' code).
    dropout
        Dropout on the attention weights (0.1).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dropout = int(heads), float(dropout)
        self.expr_norm = nn.LayerNorm(dim)
        self.q_target = _trunc_normal_linear(dim, dim)
        self.k_reference = _trunc_normal_linear(2 * dim, dim)
        self.v_reference = _trunc_normal_linear(2 * dim, dim)
        self.q_reference = _trunc_normal_linear(2 * dim, dim)
        self.k_target = _trunc_normal_linear(dim, dim)
        self.v_target = _trunc_normal_linear(dim, dim)
        self.out_target = _trunc_normal_linear(dim, dim)
        self.out_reference = _trunc_normal_linear(dim, dim)

    def forward(self, x_reference: torch.Tensor, x_target: torch.Tensor, y_reference: torch.Tensor,
                edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference and target updates along ``edge_index``.

        Parameters
        ----------
        x_reference, x_target
            ``(n_reference, d)`` and ``(n_target, d)`` node states.
        y_reference
            ``(n_reference, n_genes)`` reference expression.
        edge_index
            ``(2, E)`` edges, row 0 reference, row 1 target.

        Returns
        -------
        tuple of torch.Tensor
            ``(reference update, target update)``.
        """
        src, dst = edge_index
        joint = torch.cat([x_reference, self.expr_norm(y_reference)], dim=-1)
        to_target = edge_softmax_sum(self.q_target(x_target)[dst], self.k_reference(joint)[src],
                                     self.v_reference(joint)[src], dst, len(x_target), self.heads, self.dropout,
                                     self.training)
        to_reference = edge_softmax_sum(self.q_reference(joint)[src], self.k_target(x_target)[dst],
                                        self.v_target(x_target)[dst], src, len(x_reference), self.heads,
                                        self.dropout, self.training)
        return self.out_reference(to_reference), self.out_target(to_target)


class CrossNodeAttentionPool(nn.Module):
    """CNAP: each target pools its references by multi-head attention, with a residual (SpaHGC sec. 3.5).

    ``t = W_h x_target``; queries from ``t``, keys and values from the
    reference states along the ``CS`` edges (eq. 20-22, edge-wise as
    :func:`edge_softmax_sum`); output ``t + pooled`` (eq. 23's residual; the
    MLP of eq. 23 is the method's output layer). A target without references
    gets ``t``.

    Parameters
    ----------
    dim
        Width of the node states.
    heads
        Attention heads (4).
    dropout
        Dropout on the attention weights (0 in the authors' code).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = int(heads), float(dropout)
        self.head = nn.Linear(dim, dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x_target: torch.Tensor, x_reference: torch.Tensor, edge_index: torch.Tensor | None) -> torch.Tensor:
        """Target head output plus the attention-pooled reference states.

        Parameters
        ----------
        x_target, x_reference
            ``(n_target, d)`` and ``(n_reference, d)`` node states.
        edge_index
            ``(2, E)`` edges (row 0 reference, row 1 target), or None.

        Returns
        -------
        torch.Tensor
            ``(n_target, out)`` predictions.
        """
        t = self.head(x_target)
        if edge_index is None or edge_index.shape[1] == 0:
            return t
        src, dst = edge_index
        pooled = edge_softmax_sum(self.q(t)[dst], self.k(x_reference)[src], self.v(x_reference)[src], dst,
                                  len(t), self.heads, self.dropout, self.training)
        return t + pooled


# -- node inputs and message passing ------------------------------------------------------------


class NodeInputs(nn.Module):
    """Input projections of target and reference nodes to the hidden width.

    Targets: ``Linear(d -> h)``; references: ``Linear(d + n_genes -> h)`` of
    ``[embedding || expression]``; both then through one shared
    ``LeakyReLU(0.2) -> Dropout -> Linear(h -> h) -> LayerNorm -> LeakyReLU(0.2)``
    (no biases in the linear layers; EGGN without the dropout and the norm).
    The reference expression alone is also projected (``Linear(n_genes -> h)``),
    the expression signal the cross-type modules read at every layer
    (``wenwenmin/SpaHGC`` model.py ``HeteroGNN``; ``Yan98/EGN`` v2/model.py,
    which slices the projected hidden state instead, see docs/fidelity.md).

    Parameters
    ----------
    feature_dim, n_genes, hidden
        Embedding width, genes and hidden width.
    dropout
        Dropout of the shared transform (SpaHGC 0.2; EGGN has none).
    norm
        LayerNorm in the shared transform (SpaHGC; EGGN has none).
    """

    def __init__(self, feature_dim: int, n_genes: int, hidden: int, dropout: float = 0.2, norm: bool = True) -> None:
        super().__init__()
        self.n_genes = int(n_genes)
        self.target = nn.Linear(feature_dim, hidden, bias=False)
        self.reference = nn.Linear(feature_dim + n_genes, hidden, bias=False)
        self.expression = nn.Linear(n_genes, hidden, bias=False)
        self.shared = nn.Sequential(
            nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(hidden, hidden, bias=False),
            nn.LayerNorm(hidden) if norm else nn.Identity(), nn.LeakyReLU(0.2),
        )

    def forward(self, x_target: torch.Tensor, x_reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected target and reference nodes and the reference expression embedding.

        Parameters
        ----------
        x_target, x_reference
            Target and reference node features (the reference's last ``n_genes`` columns its expression).

        Returns
        -------
        tuple of torch.Tensor
            ``(target states, reference states, reference expression embedding)``.
        """
        y = self.expression(x_reference[:, x_reference.shape[1] - self.n_genes :])
        return self.shared(self.target(x_target)), self.shared(self.reference(x_reference)), y


class HeteroLayer(nn.Module):
    """One message-passing layer over a target/reference graph.

    GraphSAGE (mean aggregation, root weight) on ``TS`` and on ``RS`` through
    torch-geometric's ``HeteroConv``; a cross-type module on ``CS`` returning
    ``(reference update, target update)``; each node type's outputs averaged
    over the relations that reached it (``HeteroConv(aggr="mean")`` in both
    authors' code), then LeakyReLU(0.2).

    Parameters
    ----------
    hidden
        Node-state width.
    cross
        Factory of the ``CS`` module (e.g. :class:`CrossNodeDualAttention`),
        called as ``cross(hidden)``; None: no cross-type module.
    """

    def __init__(self, hidden: int, cross: Callable[[int], nn.Module] | None) -> None:
        super().__init__()
        from torch_geometric.nn import HeteroConv, SAGEConv

        self.sage = HeteroConv({TS: SAGEConv(hidden, hidden), RS: SAGEConv(hidden, hidden)}, aggr="mean")
        self.cross = cross(hidden) if cross is not None else None

    def forward(self, x: dict[str, torch.Tensor], y_reference: torch.Tensor,
                edges: dict[tuple[str, str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """One layer of message passing.

        Parameters
        ----------
        x
            Node states by node type.
        y_reference
            Reference expression embedding.
        edges
            Edge index by edge type.

        Returns
        -------
        dict of str to torch.Tensor
            The new node states by node type.
        """
        outs: dict[str, list[torch.Tensor]] = {TARGET: [], REFERENCE: []}
        same = {et: e for et, e in edges.items() if et in (TS, RS)}
        if same:
            for node, value in self.sage(x, same).items():
                outs[node].append(value)
        if self.cross is not None and CS in edges:
            to_ref, to_target = self.cross(x[REFERENCE], x[TARGET], y_reference, edges[CS])
            outs[REFERENCE].append(to_ref)
            outs[TARGET].append(to_target)
        return {node: F.leaky_relu(torch.stack(v).mean(0), 0.2) if v else x[node] for node, v in outs.items()}


class GraphExemplarBridging(nn.Module):
    """GEB: edge-gated messages between windows and their exemplars (EGGN; ``Yan98/EGN`` v2/geb.py).

    For an edge from exemplar ``j`` to window ``i``: ``s_j = W_s e_j``,
    ``d_i = W_d w_i`` (both through LeakyReLU(0.2)), ``v_j = W_y y_j`` (the
    exemplar's expression embedding); node scores ``a = A s``, ``b = A d``
    (``A``: width ``score_dim``, shared); an edge gate
    ``g = sigmoid(G(LeakyReLU(a_j - b_i)))`` of width ``2 * score_dim``, its
    first half gating the message to the window ``[s_j, v_j, d_i]`` and its
    second half the message to the exemplar ``[d_i, s_j, v_j]`` (each gate value
    covers ``3 * dim / score_dim`` consecutive channels); each gated message is
    the mean of its three parts; messages are averaged over a node's edges,
    plus a bias, then a linear output layer. No softmax: the gates are
    independent sigmoids.

    Parameters
    ----------
    dim
        Node-state width (512 in EGGN).
    score_dim
        Width of the node scores (128); ``3 * dim`` must divide by it.
    """

    def __init__(self, dim: int, score_dim: int = 128) -> None:
        super().__init__()
        if (3 * dim) % score_dim:
            raise He2stInputError(f"GEB: 3 x width {dim} is not divisible by score_dim {score_dim}")
        self.dim, self.score_dim = int(dim), int(score_dim)
        self.w_exemplar = nn.Linear(dim, dim, bias=False)
        self.w_window = nn.Linear(dim, dim, bias=False)
        self.w_expression = nn.Linear(dim, dim, bias=False)
        for lin in (self.w_exemplar, self.w_window, self.w_expression):
            nn.init.trunc_normal_(lin.weight, std=0.02)
        self.score = nn.Linear(dim, score_dim, bias=False)
        self.gate = nn.Linear(score_dim, 2 * score_dim)
        self.bias_window = nn.Parameter(torch.zeros(dim))
        self.bias_exemplar = nn.Parameter(torch.zeros(dim))
        self.out_window = nn.Linear(dim, dim)
        self.out_exemplar = nn.Linear(dim, dim)

    def _gated_mean(self, parts: tuple[torch.Tensor, ...], gate: torch.Tensor) -> torch.Tensor:
        m = torch.cat(parts, dim=-1)
        m = m * gate.repeat_interleave(3 * self.dim // self.score_dim, dim=-1)
        return m.view(len(m), 3, self.dim).mean(1)

    def forward(self, x_reference: torch.Tensor, x_target: torch.Tensor, y_reference: torch.Tensor,
                edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated exemplar <-> window messages (EGGN's graph exemplar bridging).

        Parameters
        ----------
        x_reference
            Exemplar node states.
        x_target
            Window node states.
        y_reference
            Exemplar expression embedding (the value of each message).
        edge_index
            Exemplar -> window edges (row 0 exemplar, row 1 window).

        Returns
        -------
        tuple of torch.Tensor
            The exemplar update and the window update (with their biases).
        """
        from torch_geometric.utils import scatter

        src, dst = edge_index
        s = F.leaky_relu(self.w_exemplar(x_reference), 0.2)
        d = F.leaky_relu(self.w_window(x_target), 0.2)
        v = self.w_expression(y_reference)
        a, b = self.score(s), self.score(d)
        g = torch.sigmoid(self.gate(F.leaky_relu(a[src] - b[dst], 0.2)))
        g_window, g_exemplar = g[:, : self.score_dim], g[:, self.score_dim :]
        to_window = self._gated_mean((s[src], v[src], d[dst]), g_window)
        to_exemplar = self._gated_mean((d[dst], s[src], v[src]), g_exemplar)
        to_window = scatter(to_window, dst, dim=0, dim_size=len(x_target), reduce="mean") + self.bias_window
        to_exemplar = scatter(to_exemplar, src, dim=0, dim_size=len(x_reference), reduce="mean") + self.bias_exemplar
        return self.out_exemplar(to_exemplar), self.out_window(to_window)


class ExemplarAttentionHead(nn.Module):
    """EGGN's prediction head: a window plus the attention-weighted sum of its exemplars.

    ``h_i = W w_i``; for the exemplars ``j`` of window ``i``, per-channel weights
    ``alpha_ij = softmax_j(T (e_j - h_i))``; output ``h_i + lambda * sum_j alpha_ij * e_j``
    with a learnable ``lambda`` (``Yan98/EGN`` v2/csra.py, a graph version of CSRA's
    class-specific residual attention). A window without exemplars gets ``h_i``.

    Parameters
    ----------
    dim
        Node-state width.
    temperature
        ``T`` (0.1).
    lam
        Initial ``lambda`` (0.1).
    """

    def __init__(self, dim: int, temperature: float = 0.1, lam: float = 0.1) -> None:
        super().__init__()
        self.head = nn.Linear(dim, dim)
        self.temperature = float(temperature)
        self.lam = nn.Parameter(torch.tensor(float(lam)))

    def forward(self, x_target: torch.Tensor, x_reference: torch.Tensor, edge_index: torch.Tensor | None) -> torch.Tensor:
        """Window head output plus ``lam`` x the softmax-weighted exemplar states.

        Parameters
        ----------
        x_target
            Window node states.
        x_reference
            Exemplar node states (already on the output width).
        edge_index
            Exemplar -> window edges, or None for the head alone.

        Returns
        -------
        torch.Tensor
            Predictions per window node.
        """
        from torch_geometric.utils import scatter, softmax

        h = self.head(x_target)
        if edge_index is None or edge_index.shape[1] == 0:
            return h
        src, dst = edge_index
        alpha = softmax(self.temperature * (x_reference[src] - h[dst]), dst, num_nodes=len(h), dim=0)
        pooled = scatter(alpha * x_reference[src], dst, dim=0, dim_size=len(h), reduce="sum")
        return h + self.lam * pooled


class HeteroEncoder(nn.Module):
    """Input projections, then ``layers`` :class:`HeteroLayer` s over an exemplar graph.

    The reference expression embedding is carried unchanged through the
    layers but, as in both authors' code (their layer loop activates every
    entry of the node dictionary), passes a LeakyReLU(0.2) after each layer.

    Parameters
    ----------
    feature_dim, n_genes, hidden, layers
        Embedding width, genes, state width and number of layers.
    cross
        Factory of the ``CS`` module (None: no cross-type message passing).
    dropout, norm
        Of the input transform (:class:`NodeInputs`).
    """

    def __init__(self, feature_dim: int, n_genes: int, hidden: int, layers: int,
                 cross: Callable[[int], nn.Module] | None, dropout: float = 0.2, norm: bool = True) -> None:
        super().__init__()
        self.inputs = NodeInputs(feature_dim, n_genes, hidden, dropout=dropout, norm=norm)
        self.layers = nn.ModuleList([HeteroLayer(hidden, cross) for _ in range(layers)])

    def forward(self, x_target: torch.Tensor, x_reference: torch.Tensor,
                edges: dict[tuple[str, str, str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the graph's nodes.

        Parameters
        ----------
        x_target, x_reference
            Target and reference node features.
        edges
            Edge index by edge type.

        Returns
        -------
        tuple of torch.Tensor
            ``(target states, reference states)``.
        """
        t, r, y = self.inputs(x_target, x_reference)
        x = {TARGET: t, REFERENCE: r}
        for layer in self.layers:
            x = layer(x, y, edges)
            y = F.leaky_relu(y, 0.2)
        return x[TARGET], x[REFERENCE]
