"""Spatial graphs over spots: k-nearest-neighbour and radius graphs.

Built with a KD-tree (:class:`sklearn.neighbors.NearestNeighbors`), which is
exact and ``O(n log n)`` in two dimensions, so a 50,000-spot slide takes well
under a second and never needs an ``n x n`` distance matrix (the published
Hist2ST/THItoGene code loops over a dense ``n x n`` matrix; torch-cluster,
which torch-geometric would use, is not installable here).

Edge lists follow torch-geometric's convention: ``edge_index[0]`` is the source
(the neighbour whose message is sent) and ``edge_index[1]`` the target (the
spot that aggregates), so ``SAGEConv``/``GATConv``/``GCNConv`` consume them as is.

Ties are common on regular spot grids (a hexagonal Visium grid has six
equidistant neighbours, a square ST grid four), so which ``k`` of them are kept
must not depend on floating-point noise: distances are compared after rounding
to a millionth of the grid spacing, and equal distances are broken by the
smaller spot index.
"""

from __future__ import annotations

import numpy as np

from he2st.errors import He2stInputError

__all__ = [
    "graph_smooth",
    "grid_positions",
    "knn_graph",
    "knn_neighbors",
    "radius_graph",
    "radius_neighbors",
    "spot_spacing",
    "to_dense_adjacency",
]

# Relative tolerance under which two distances count as equal (ties).
_TIE_RTOL = 1e-6


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 1:
        raise He2stInputError(f"spot coordinates must be an (n, d) array, got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise He2stInputError("spot coordinates contain NaN or inf")
    return coords


def spot_spacing(coords: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot (the grid pitch).

    Returns 1.0 for fewer than two spots, so it can always scale a tolerance.
    """
    coords = _check_coords(coords)
    if len(coords) < 2:
        return 1.0
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=2).fit(coords).kneighbors(coords)
    d = dist[:, 1]
    d = d[d > 0]
    return float(np.median(d)) if d.size else 1.0


def knn_neighbors(coords: np.ndarray, k: int, *, include_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest spots of every spot, ties broken by spot index.

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates.
    k
        Neighbours per spot; capped at the number of other spots (``n - 1``,
        or ``n`` with ``include_self``).
    include_self
        Count the spot itself as its first neighbour (distance 0).

    Returns
    -------
    indices, distances
        ``(n, k')`` int64 and float64 arrays, nearest first.
    """
    coords = _check_coords(coords)
    n = len(coords)
    if k < 0:
        raise He2stInputError(f"k must be >= 0, got {k}")
    avail = n if include_self else n - 1
    k = min(k, max(avail, 0))
    if k == 0 or n == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float64)
    from sklearn.neighbors import NearestNeighbors

    # Ask for extra candidates so that ties at the k-th distance can be broken
    # by index rather than by the KD-tree's traversal order.
    n_cand = min(n, k + 1 + max(8, k))
    dist, idx = NearestNeighbors(n_neighbors=n_cand).fit(coords).kneighbors(coords)
    scale = spot_spacing(coords) * _TIE_RTOL
    rounded = np.round(dist / scale)
    self_idx = np.arange(n)[:, None]
    # The query point itself always comes first (distance 0); duplicated
    # coordinates would otherwise let another spot take its place.
    is_self = idx == self_idx
    order = np.lexsort((idx, rounded, ~is_self), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    is_self = np.take_along_axis(is_self, order, axis=1)
    if not include_self:
        if is_self[:, 0].all():
            idx, dist = idx[:, 1 : k + 1], dist[:, 1 : k + 1]
        else:
            # Rare: a spot shares its coordinates with many others and fell
            # out of its own candidate list; drop self wherever it is.
            keep = ~is_self
            idx = np.stack([row[m][:k] for row, m in zip(idx, keep, strict=True)])
            dist = np.stack([row[m][:k] for row, m in zip(dist, keep, strict=True)])
    else:
        idx, dist = idx[:, :k], dist[:, :k]
    return idx.astype(np.int64), dist


def knn_graph(
    coords: np.ndarray,
    k: int = 4,
    *,
    symmetric: bool = False,
    max_distance: float | None = None,
    self_loops: bool = False,
) -> np.ndarray:
    """Directed k-nearest-neighbour graph as a ``(2, E)`` int64 edge index.

    Each spot receives edges from its ``k`` nearest spots (row 0 = neighbour,
    row 1 = spot). This is Hist2ST's and THItoGene's spot graph (``k = 4``).

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates (array or pixel units).
    k
        Neighbours per spot.
    symmetric
        Also add the reverse of every edge (duplicates removed), so that the
        adjacency is symmetric.
    max_distance
        Drop edges longer than this (same units as ``coords``). Hist2ST's
        ``"Grid"`` pruning keeps neighbours within 2 array units.
    self_loops
        Add an edge from every spot to itself.

    Returns
    -------
    numpy.ndarray
        ``(2, E)`` int64 edge index, row 0 the source (neighbour) and row 1 the
        target (spot), unique and sorted by target then source.
    """
    coords = _check_coords(coords)
    n = len(coords)
    idx, dist = knn_neighbors(coords, k)
    tgt = np.repeat(np.arange(n, dtype=np.int64), idx.shape[1])
    src = idx.ravel()
    if max_distance is not None:
        keep = dist.ravel() <= max_distance * (1 + _TIE_RTOL)
        src, tgt = src[keep], tgt[keep]
    return _finish_edges(src, tgt, n, symmetric, self_loops)


def radius_neighbors(
    coords: np.ndarray, radius: float, *, include_self: bool = True, max_neighbors: int | None = None
) -> np.ndarray:
    """Spots within ``radius`` of every spot, as a ``(n, m)`` int64 array padded with -1.

    Neighbours are sorted by distance (ties by index); ``max_neighbors`` keeps
    only the nearest ones, bounding memory on dense slides.

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates.
    radius
        Neighbourhood radius, in the units of ``coords`` (must be positive);
        distances equal to it up to a relative ``1e-6`` count as inside.
    include_self
        Keep the spot itself as its own first neighbour.
    max_neighbors
        Keep at most this many (the nearest) neighbours per spot; ``None``
        keeps all.

    Returns
    -------
    numpy.ndarray
        ``(n, m)`` int64 neighbour indices, nearest first (the spot itself
        first when ``include_self``), with ``m`` the largest neighbour count
        and shorter rows padded with -1.
    """
    coords = _check_coords(coords)
    if not radius > 0:
        raise He2stInputError(f"radius must be positive, got {radius}")
    from sklearn.neighbors import NearestNeighbors

    n = len(coords)
    dists, idxs = NearestNeighbors(radius=radius * (1 + _TIE_RTOL)).fit(coords).radius_neighbors(coords, sort_results=True)
    scale = spot_spacing(coords) * _TIE_RTOL
    rows = []
    for i, (d, j) in enumerate(zip(dists, idxs, strict=True)):
        if not include_self:
            m = j != i
            d, j = d[m], j[m]
        order = np.lexsort((j, np.round(d / scale), j != i))
        j = j[order]
        if max_neighbors is not None:
            j = j[:max_neighbors]
        rows.append(j)
    width = max((len(r) for r in rows), default=0)
    out = np.full((n, width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def radius_graph(coords: np.ndarray, radius: float, *, self_loops: bool = False) -> np.ndarray:
    """Edges between all spots closer than ``radius`` (symmetric by construction).

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates.
    radius
        Neighbourhood radius, in the units of ``coords`` (must be positive).
    self_loops
        Add an edge from every spot to itself.

    Returns
    -------
    numpy.ndarray
        ``(2, E)`` int64 edge index (row 0 source, row 1 target), unique and
        sorted by target then source.
    """
    nbr = radius_neighbors(coords, radius, include_self=False)
    n = len(nbr)
    tgt = np.repeat(np.arange(n, dtype=np.int64), nbr.shape[1])
    src = nbr.ravel()
    keep = src >= 0
    return _finish_edges(src[keep], tgt[keep], n, False, self_loops)


def _finish_edges(src: np.ndarray, tgt: np.ndarray, n: int, symmetric: bool, self_loops: bool) -> np.ndarray:
    if symmetric:
        src, tgt = np.concatenate([src, tgt]), np.concatenate([tgt, src])
    if self_loops:
        ar = np.arange(n, dtype=np.int64)
        src, tgt = np.concatenate([src, ar]), np.concatenate([tgt, ar])
    edges = np.stack([src, tgt]).astype(np.int64)
    if edges.shape[1]:
        # Unique edges, sorted by target then source: a canonical order makes
        # graphs comparable and message passing deterministic.
        key = edges[1] * max(n, 1) + edges[0]
        _, first = np.unique(key, return_index=True)
        edges = edges[:, first]
    return edges


def to_dense_adjacency(edge_index: np.ndarray, n: int) -> np.ndarray:
    """Boolean ``(n, n)`` adjacency with ``A[target, source] = True`` (small graphs, tests).

    Parameters
    ----------
    edge_index
        ``(2, E)`` integer edge index, row 0 the source and row 1 the target.
    n
        Number of nodes.

    Returns
    -------
    numpy.ndarray
        ``(n, n)`` boolean adjacency matrix, ``A[target, source]`` set for
        every edge.
    """
    adj = np.zeros((n, n), dtype=bool)
    edge_index = np.asarray(edge_index)
    adj[edge_index[1], edge_index[0]] = True
    return adj


def grid_positions(grid: np.ndarray, n_pos: int) -> np.ndarray:
    """Integer position indices in ``[0, n_pos)`` for learnable x/y embeddings.

    HisToGene, Hist2ST and THItoGene index two embedding tables (``n_pos = 64``
    rows each) by a spot's integer array coordinates. Coordinates are shifted
    so the smallest is 0; when a slide spans ``n_pos`` or more grid steps along
    an axis (Visium columns run to 127), that axis is rescaled into
    ``[0, n_pos)`` rather than indexing past the table, which the published code
    does and which crashes. On a Visium grid (columns step by 2 within a row)
    halving the column index keeps every spot's ``(x, y)`` pair distinct as
    long as the rows fit in the table (a window of the slide); a whole Visium
    slide (78 rows, 4992 spots > 64 x 64 cells) cannot stay distinct.

    Parameters
    ----------
    grid
        ``(n, 2)`` integer grid coordinates ``(x, y)`` = ``(array_col, array_row)``.
    n_pos
        Rows of each embedding table.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int64 position indices in ``[0, n_pos)``, one column per
        axis.
    """
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.shape[1] != 2:
        raise He2stInputError(f"grid coordinates must be (n, 2), got {grid.shape}")
    grid = np.round(grid.astype(np.float64)).astype(np.int64)
    out = np.empty_like(grid)
    for a in range(2):
        c = grid[:, a] - (grid[:, a].min() if len(grid) else 0)
        span = int(c.max()) + 1 if len(c) else 1
        if span > n_pos:
            c = (c * n_pos) // span
        out[:, a] = c
    return out


#: Ring-1 radius of the smoothing graph, in grid spacings: the 6 nearest spots of a hexagonal
#: (Visium) lattice, the 4 of a square (ST) one; the next ring is at sqrt(2) or sqrt(3) spacings.
SMOOTH_RADIUS = 1.2


def graph_smooth(values: np.ndarray, coords: np.ndarray, strength: float | np.ndarray, radius: float = SMOOTH_RADIUS) -> np.ndarray:
    """Tikhonov smoothing of spot maps over the lattice graph: ``(I + strength * L)^-1 values``.

    ``L = D - A`` is the combinatorial Laplacian of the graph joining spots closer
    than ``radius`` grid spacings (:func:`spot_spacing`), so the result minimises
    ``|x - values|^2 + strength * sum_edges (x_i - x_j)^2`` per gene: the
    smoothness penalty of a Gaussian Markov random field on the lattice. Strength
    0 returns the values unchanged; an isolated spot keeps its value; each
    connected component keeps its mean. One sparse LU factorisation serves every
    gene sharing a strength.

    Parameters
    ----------
    values
        ``(n_spots, n_genes)`` maps.
    coords
        ``(n_spots, 2)`` spot positions (any unit: the radius is relative to the spacing).
    strength
        Non-negative smoothing strength, one for all genes or ``(n_genes,)``.
    radius
        Edge radius in grid spacings.

    Returns
    -------
    numpy.ndarray
        float64 ``(n_spots, n_genes)`` smoothed maps.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(coords):
        raise He2stInputError(f"graph_smooth: values of shape {x.shape} do not match {len(coords)} spots")
    t = np.broadcast_to(np.asarray(strength, dtype=np.float64), (x.shape[1],))
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise He2stInputError(f"graph_smooth: strength must be non-negative, got {strength!r}")
    out = x.copy()
    if len(x) < 2 or not np.any(t > 0):
        return out
    edges = radius_graph(coords, radius * spot_spacing(coords))
    n = len(x)
    adj = sp.csr_matrix((np.ones(edges.shape[1]), (edges[1], edges[0])), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.float64)
    lap = sp.diags(np.asarray(adj.sum(axis=1)).ravel()) - adj
    eye = sp.identity(n, format="csc")
    for value in np.unique(t[t > 0]):
        cols = np.flatnonzero(t == value)
        out[:, cols] = splu((eye + value * lap).tocsc()).solve(np.ascontiguousarray(x[:, cols]))
    return out
