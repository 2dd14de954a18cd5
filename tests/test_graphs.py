"""Spatial spot graphs, position indices and local attention (he2st.methods.nn.graphs / transformer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he2st.errors import He2stInputError
from he2st.methods.nn.graphs import (
    grid_positions,
    knn_graph,
    knn_neighbors,
    radius_graph,
    radius_neighbors,
    spot_spacing,
    to_dense_adjacency,
)
from he2st.methods.nn.transformer import (
    SpotAttention,
    SpotTransformer,
    attention_neighbors,
)


def visium_grid(n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], int]]:
    """Visium array coordinates (col even/odd by row), pixel centres (pitch 100) and a (row, col) -> index map."""
    rows, cols, xy = [], [], []
    for r in range(n_rows):
        for c in range(r % 2, 2 * n_cols, 2):
            rows.append(r)
            cols.append(c)
            xy.append((c * 50.0, r * 50.0 * np.sqrt(3.0)))
    grid = np.stack([cols, rows], axis=1).astype(float)
    index = {(r, c): i for i, (r, c) in enumerate(zip(rows, cols))}
    return grid, np.asarray(xy), index


def test_knn_on_visium_array_coordinates_gives_the_four_diagonal_neighbours() -> None:
    grid, _, index = visium_grid(5, 5)
    edges = knn_graph(grid, k=4)
    centre = index[(2, 4)]
    sources = set(edges[0, edges[1] == centre].tolist())
    # In array units the diagonal neighbours are sqrt(2) away, the same-row ones 2.
    expected = {index[(1, 3)], index[(1, 5)], index[(3, 3)], index[(3, 5)]}
    assert sources == expected
    # Every spot has exactly 4 incoming edges and none from itself.
    assert np.bincount(edges[1], minlength=len(grid)).tolist() == [4] * len(grid)
    assert not (edges[0] == edges[1]).any()


def test_knn_on_square_st_grid_gives_the_four_axis_neighbours() -> None:
    xs, ys = np.meshgrid(np.arange(6), np.arange(6))
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)
    edges = knn_graph(grid, k=4)
    centre = 2 * 6 + 3  # (x=3, y=2)
    assert sorted(edges[0, edges[1] == centre].tolist()) == [1 * 6 + 3, 2 * 6 + 2, 2 * 6 + 4, 3 * 6 + 3]
    # Interior 4-NN on a square grid is symmetric.
    adj = to_dense_adjacency(edges, len(grid))
    interior = [(y * 6 + x) for y in range(1, 5) for x in range(1, 5)]
    sub = adj[np.ix_(interior, interior)]
    assert (sub == sub.T).all()


def test_hex_pixel_ties_are_broken_by_index_and_are_reproducible() -> None:
    _, xy, index = visium_grid(5, 5)
    centre = index[(2, 4)]
    idx, dist = knn_neighbors(xy, 4)
    # Six neighbours are exactly 100 px away; the four with the smallest indices are kept.
    six = sorted([index[(1, 3)], index[(1, 5)], index[(2, 2)], index[(2, 6)], index[(3, 3)], index[(3, 5)]])
    assert sorted(idx[centre].tolist()) == six[:4]
    np.testing.assert_allclose(dist[centre], 100.0)
    # Reversing the input order gives the same graph up to relabelling ties by the new indices.
    idx2, _ = knn_neighbors(xy[::-1].copy(), 4)
    n = len(xy)
    assert sorted((n - 1 - idx2[n - 1 - centre]).tolist()) == six[-4:]


def test_symmetric_option_and_pruning() -> None:
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    directed = knn_graph(pts, k=1)
    # 0<-1, 1<-0 (tie 0/2 broken by index), 2<-1, 3<-2.
    assert sorted(map(tuple, directed.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 3)]
    sym = knn_graph(pts, k=1, symmetric=True)
    adj = to_dense_adjacency(sym, 4)
    assert (adj == adj.T).all() and to_dense_adjacency(directed, 4)[adj == 0].sum() == 0
    assert adj[2, 3] and adj[3, 2]
    # Hist2ST's Grid pruning: the isolated spot keeps no neighbour.
    pruned = knn_graph(pts, k=1, max_distance=2.0)
    assert 3 not in pruned[1].tolist()
    loops = knn_graph(pts, k=1, self_loops=True)
    assert all((i, i) in set(map(tuple, loops.T.tolist())) for i in range(4))


def test_radius_neighbours_and_graph() -> None:
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5], [5.0, 5.0]])
    nbr = radius_neighbors(pts, 1.2)
    assert nbr.shape == (4, 2)
    assert nbr[0].tolist() == [0, 1] and nbr[1].tolist() == [1, 0]
    assert nbr[2].tolist() == [2, -1] and nbr[3].tolist() == [3, -1]
    edges = radius_graph(pts, 1.6)
    assert sorted(map(tuple, edges.T.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    with pytest.raises(He2stInputError):
        radius_neighbors(pts, 0.0)


def test_spot_spacing_and_bad_input() -> None:
    _, xy, _ = visium_grid(4, 4)
    assert spot_spacing(xy) == pytest.approx(100.0)
    with pytest.raises(He2stInputError, match="NaN"):
        knn_graph(np.array([[0.0, np.nan], [1.0, 1.0]]))
    # k larger than the slide: capped, no error.
    assert knn_neighbors(np.array([[0.0, 0.0], [1.0, 0.0]]), 4)[0].tolist() == [[1], [0]]


def test_grid_positions_shift_and_fit_visium_columns() -> None:
    grid = np.array([[10, 3], [12, 3], [11, 4]])
    np.testing.assert_array_equal(grid_positions(grid, 64), [[0, 0], [2, 0], [1, 1]])
    # A Visium window 30 rows high spans 128 columns: halved into the 64 rows
    # of the table, every spot keeps a distinct (x, y) pair.
    vis, _, _ = visium_grid(30, 64)
    pos = grid_positions(vis, 64)
    assert pos[:, 0].min() == 0 and pos[:, 0].max() == 63 and pos[:, 1].max() == 29
    assert len(np.unique(pos, axis=0)) == len(vis)
    # A whole Visium slide (78 rows) is squeezed into the tables, never past them.
    full, _, _ = visium_grid(78, 64)
    assert grid_positions(full, 64).max() == 63


def test_position_embeddings_are_distinct_per_spot() -> None:
    from he2st.methods.histogene import HisToGeneNet

    grid, _, _ = visium_grid(8, 8)
    pos = torch.from_numpy(grid_positions(grid, 64))
    net = HisToGeneNet(patch_px=4, n_genes=3, dim=16, depth=1, heads=2, dim_head=8)
    emb = net.position_embedding(pos).detach()
    d = torch.cdist(emb, emb) + torch.eye(len(emb)) * 1e9
    assert float(d.min()) > 1e-3


def test_local_attention_matches_full_when_every_spot_is_a_neighbour() -> None:
    torch.manual_seed(0)
    n = 40
    x = torch.randn(n, 16)
    att = SpotAttention(16, heads=2, dim_head=8)
    full = att(x)
    local = att(x, torch.arange(n).repeat(n, 1))
    torch.testing.assert_close(local, full, atol=1e-5, rtol=1e-5)
    explicit = SpotAttention(16, heads=2, dim_head=8, explicit=True)
    explicit.load_state_dict(att.state_dict())
    torch.testing.assert_close(explicit(x), full, atol=1e-5, rtol=1e-5)
    # With only itself as neighbour a spot's output is the projection of its own value.
    self_only = att(x, torch.arange(n).unsqueeze(1))
    v = att.to_qkv(x).view(n, 3, 2, 8)[:, 2].reshape(n, 16)
    torch.testing.assert_close(self_only, att.to_out(v), atol=1e-5, rtol=1e-5)
    # Padding (-1) is ignored.
    padded = torch.cat([torch.arange(n).unsqueeze(1), torch.full((n, 3), -1)], dim=1)
    torch.testing.assert_close(att(x, padded), self_only, atol=1e-6, rtol=1e-6)


def test_local_attention_backward_and_neighbour_lists() -> None:
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 500, (60, 2))
    nbr = attention_neighbors(coords, "knn", k=8)
    assert nbr.shape == (60, 8) and (nbr.index[:, 0] == torch.arange(60)).all()
    assert sorted(nbr.order.tolist()) == list(range(60))  # a permutation of the spots
    assert attention_neighbors(coords, "full") is None
    rad = attention_neighbors(coords, "radius", radius=80.0)
    assert (rad.index[:, 0] == torch.arange(60)).all()
    with pytest.raises(He2stInputError):
        attention_neighbors(coords, "radius")
    t = SpotTransformer(16, depth=2, heads=2, dim_head=8, attention="knn")
    x = torch.randn(60, 16, requires_grad=True)
    t(x, nbr).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(He2stInputError):
        t(x)


def test_chunked_local_attention_matches_a_direct_computation() -> None:
    """Over more spots than one chunk, with -1 padding: the same as per-query softmax over its neighbours."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 2000, (700, 2))
    nbr = attention_neighbors(coords, "radius", radius=120.0, max_neighbors=12)
    assert (nbr.index < 0).any()  # some spots have fewer than 12 neighbours
    att = SpotAttention(16, heads=2, dim_head=8)
    x = torch.randn(700, 16)
    out = att(x, nbr)
    q, k, v = att.to_qkv(x).view(700, 3, 2, 8).unbind(1)
    ref = torch.empty_like(q)
    for i in range(700):
        j = nbr.index[i][nbr.index[i] >= 0]
        w = torch.softmax(torch.einsum("hd,mhd->hm", q[i], k[j]) * 8**-0.5, dim=-1)
        ref[i] = torch.einsum("hm,mhd->hd", w, v[j])
    torch.testing.assert_close(out, att.to_out(ref.reshape(700, 16)), atol=1e-5, rtol=1e-5)
