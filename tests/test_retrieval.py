"""The retrieval engine: exact and approximate top-k search, aggregation, reference banks."""

from __future__ import annotations

import numpy as np
import pytest

from he2st.errors import He2stInputError
from he2st.retrieval import (
    BankLeakageError,
    Neighbors,
    ReferenceBank,
    aggregate,
    build_index,
    neighbor_weights,
    recall_at_k,
)


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference answer: every distance in float64, then a stable sort."""
    b, q = bank.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        d = np.sqrt(((q[:, None, :] - b[None]) ** 2).sum(-1))
    elif metric == "l1":
        d = np.abs(q[:, None, :] - b[None]).sum(-1)
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        d = 1.0 - qn @ bn.T
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    return bank, queries


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings (like a trained joint space), queries from the same clusters."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(60, 24)).astype(np.float32) * 3
    bank = centres[rng.integers(0, 60, 12000)] + rng.normal(size=(12000, 24)).astype(np.float32)
    queries = centres[rng.integers(0, 60, 300)] + rng.normal(size=(300, 24)).astype(np.float32)
    return bank.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exact_search_equals_brute_force(data, metric, backend) -> None:
    bank, q = data
    index = build_index(bank, metric, "exact", backend=backend)
    if backend == "torch":
        index.bank_chunk, index.query_chunk = 700, 16  # several chunks on both axes
    nb = index.search(q, 7)
    idx, dist = brute_force(bank, q, 7, metric)
    np.testing.assert_allclose(nb.distances, dist, rtol=1e-5, atol=1e-5)
    # Same neighbour sets (ties, if any, may be ordered differently).
    assert recall_at_k(nb.indices, idx) == 1.0
    assert (np.diff(nb.distances, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_bf16_candidates_float32_ranking(data, tmp_path, metric) -> None:
    bank, q = data
    idx, dist = brute_force(bank, q, 7, metric)
    index = build_index(bank, metric, "exact", precision="bf16")
    index.bank_chunk = 700
    nb = index.search(q, 7)
    assert recall_at_k(nb.indices, idx) == 1.0  # 200 bf16 candidates always contain the true 7
    np.testing.assert_allclose(nb.distances, dist, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "b.npy", bank)
    mm = build_index(np.load(tmp_path / "b.npy", mmap_mode="r"), metric, "exact", precision="bf16")
    np.testing.assert_array_equal(mm.search(q, 7).indices, nb.indices)
    with pytest.raises(He2stInputError, match="l1"):
        build_index(bank, "l1", "exact", precision="bf16")


def test_exact_search_on_memmap_bank(tmp_path, data) -> None:
    bank, q = data
    path = tmp_path / "bank.npy"
    np.save(path, bank)
    mm = np.load(path, mmap_mode="r")
    index = build_index(mm, "l2", "exact")
    index.bank_chunk = 512
    nb = index.search(q, 5)
    idx, _ = brute_force(bank, q, 5, "l2")
    assert recall_at_k(nb.indices, idx) == 1.0
    assert isinstance(index.embeddings, np.memmap)  # nothing was copied into memory


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclusion_and_padding(data, backend) -> None:
    bank, q = data
    index = build_index(bank, "cosine", "exact", backend=backend)
    excluded = np.arange(0, 3000, 2)
    nb = index.search(q, 10, exclude=excluded)
    assert not np.isin(nb.indices, excluded).any()
    idx, _ = brute_force(bank[1::2], q, 10, "cosine")
    assert recall_at_k(nb.indices, idx * 2 + 1) == 1.0
    # k larger than the eligible rows: padded with -1 / inf
    small = build_index(bank[:5], "l2", "exact", backend=backend)
    nb = small.search(q[:2], 4, exclude=[0, 1, 2])
    assert (nb.indices[:, 2:] == -1).all() and np.isinf(nb.distances[:, 2:]).all()
    assert set(nb.indices[0, :2]) == {3, 4}
    with pytest.raises(He2stInputError, match="excluded"):
        small.search(q[:1], 1, exclude=np.ones(5, dtype=bool))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_approximate_meets_requested_recall(clustered, kind, metric) -> None:
    bank, q = clustered
    index = build_index(bank, metric, kind, k=20, target_recall=0.9, seed=0)
    assert index.backend == "faiss"  # approximate indexes are faiss whatever the (exact) backend
    cal = index.calibration
    assert cal.recall >= 0.9 and cal.k == 20 and cal.n_queries > 0
    # Held-out calibration predicts the recall on new queries from the same distribution.
    truth = build_index(bank, metric, "exact").search(q, 20).indices
    found = index.search(q, 20)
    assert recall_at_k(found.indices, truth) >= 0.85
    # Distances are exact for the rows found, whatever the index.
    _, d = brute_force(bank, q, 20, metric)
    assert (found.distances >= d - 1e-4).all()
    # Cheaper settings were tried and fell short, unless the cheapest already met the target.
    params = index.describe()["params"]
    setting = params["nprobe"] if kind == "ivf" else params["efSearch"]
    below = [r for s, r in cal.tried.items() if s < setting]
    assert all(r < 0.9 for r in below)


def test_approximate_with_user_calibration_queries(clustered) -> None:
    bank, q = clustered
    index = build_index(bank, "l2", "ivf", k=10, target_recall=0.95, calibration_queries=q[:200], seed=3)
    truth = build_index(bank, "l2", "exact").search(q[:200], 10).indices
    assert recall_at_k(index.search(q[:200], 10).indices, truth) == pytest.approx(index.calibration.recall)
    assert index.calibration.recall >= 0.95


def test_bad_inputs(data) -> None:
    bank, q = data
    with pytest.raises(He2stInputError, match="metric"):
        build_index(bank, "hamming")
    with pytest.raises(He2stInputError, match="kind"):
        build_index(bank, "l2", "lsh")
    with pytest.raises(He2stInputError, match=r"\(n, 16\)"):
        build_index(bank, "l2").search(q[:, :3], 2)
    with pytest.raises(He2stInputError, match="NaN"):
        build_index(bank, "l2").search(np.full((1, 16), np.nan, np.float32), 2)


# -- aggregation ---------------------------------------------------------------------


def _nb(dist: list[list[float]], metric: str = "l2", idx: list[list[int]] | None = None) -> Neighbors:
    d = np.asarray(dist, dtype=np.float32)
    i = np.asarray(idx if idx is not None else [list(range(d.shape[1]))] * d.shape[0], dtype=np.int64)
    return Neighbors(i, d, metric)


def test_inverse_square_weights_hand_computed() -> None:
    # mclSTExp eq. 15: w_i = d_i^-2 / sum_j d_j^-2. Distances 1 and 2: 1 / (1 + 1/4) = 0.8 and 0.2.
    w = neighbor_weights(_nb([[1.0, 2.0], [2.0, 2.0]]), "inverse_square")
    np.testing.assert_allclose(w, [[0.8, 0.2], [0.5, 0.5]])
    # Distances 1, 2, 4: weights proportional to 1, 1/4, 1/16 -> 16/21, 4/21, 1/21.
    w = neighbor_weights(_nb([[1.0, 2.0, 4.0]]), "inverse_square")
    np.testing.assert_allclose(w, [[16 / 21, 4 / 21, 1 / 21]])
    # eq. 16 on values 10, 20, 40: (160 + 80 + 40) / 21
    values = np.array([[10.0], [20.0], [40.0]], dtype=np.float32)
    pred = aggregate(values, _nb([[1.0, 2.0, 4.0]]), "inverse_square")
    np.testing.assert_allclose(pred, [[280 / 21]], rtol=1e-6)
    # A neighbour at distance 0 (an exact match) takes all the weight.
    np.testing.assert_allclose(neighbor_weights(_nb([[0.0, 1.0, 0.0]]), "inverse_square"), [[0.5, 0.0, 0.5]])


def test_mean_and_softmax_weights() -> None:
    nb = _nb([[1.0, 2.0, 3.0]], "l2", [[0, 1, -1]])  # third neighbour missing
    np.testing.assert_allclose(neighbor_weights(nb, "mean"), [[0.5, 0.5, 0.0]])
    # softmax of -d^2 for L2: exp(-1), exp(-4) normalised
    e1, e4 = np.exp(-1.0), np.exp(-4.0)
    np.testing.assert_allclose(neighbor_weights(nb, "softmax"), [[e1 / (e1 + e4), e4 / (e1 + e4), 0.0]])
    # cosine: similarity = 1 - distance; temperature 0.5 doubles the logits
    nb = _nb([[0.0, 0.5]], "cosine")
    a, b = np.exp(1.0 / 0.5), np.exp(0.5 / 0.5)
    np.testing.assert_allclose(neighbor_weights(nb, "softmax", temperature=0.5), [[a / (a + b), b / (a + b)]])
    values = np.array([[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]], dtype=np.float32)
    np.testing.assert_allclose(aggregate(values, _nb([[1.0, 2.0, 3.0]], "l2", [[0, 1, -1]]), "mean"), [[2.0, 1.0]])
    with pytest.raises(He2stInputError, match="aggregation"):
        neighbor_weights(nb, "median")


# -- banks -----------------------------------------------------------------------------------


def _bank(metric: str = "cosine") -> ReferenceBank:
    rng = np.random.default_rng(2)
    blocks = []
    for sid, patient, origin, n in [("A1", "A", "train", 50), ("A2", "A", "train", 40), ("B1", "B", "reference", 30)]:
        blocks.append((rng.normal(size=(n, 8)), rng.normal(size=(n, 3)), sid, patient, origin))
    return ReferenceBank.from_blocks(blocks, metric=metric, genes=["g1", "g2", "g3"])


def test_bank_provenance_and_leakage_guard() -> None:
    bank = _bank()
    assert bank.slide_ids == ["A1", "A2", "B1"] and bank.patients == ["A", "B"] and bank.n == 120
    np.testing.assert_array_equal(bank.rows_of(patients=["B"]), np.arange(90, 120))
    np.testing.assert_array_equal(bank.rows_of(slide_ids=["A2"]), np.arange(50, 90))
    assert len(bank.rows_of(patients=["A"], origins=["reference"])) == 0
    with pytest.raises(BankLeakageError, match="A2"):
        bank.check_not_in_bank("A2")
    bank.check_not_in_bank("C1")
    # excluded rows are never retrieved
    _, nb = bank.predict(np.asarray(bank.embeddings[:5]), 20, exclude=bank.rows_of(patients=["A"]))
    assert (nb.indices >= 90).all()
    with pytest.raises(He2stInputError, match="twice"):
        ReferenceBank.from_blocks([(np.ones((2, 2)), np.ones((2, 1)), "X", "P", "train")] * 2)
    with pytest.raises(He2stInputError, match="origin"):
        ReferenceBank.from_blocks([(np.ones((2, 2)), np.ones((2, 1)), "X", "P", "test")])


@pytest.mark.parametrize(("kind", "backend"), [("exact", "torch"), ("ivf", "faiss"), ("hnsw", "faiss")])
def test_bank_save_load_mmap(tmp_path, kind, backend) -> None:
    bank = _bank("l2")
    if kind != "exact":
        bank.build_index(kind, backend=backend, k=5, target_recall=0.9, seed=1)
    q = np.random.default_rng(5).normal(size=(7, 8)).astype(np.float32)
    pred, nb = bank.predict(q, 5, "inverse_square")
    bank.save(tmp_path / "bank")
    files = {"exact": [], "faiss": ["index.faiss", "index_ids.npy"]}
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == sorted(
        ["bank.json", "embeddings.npy", "values.npy"] + files["exact" if kind == "exact" else backend]
    )
    loaded = ReferenceBank.load(tmp_path / "bank", mmap=True)
    assert isinstance(loaded.embeddings, np.memmap) and isinstance(loaded.values, np.memmap)
    assert loaded.slide_ids == bank.slide_ids and loaded.genes == ["g1", "g2", "g3"]
    assert loaded.index is not None and loaded.index.kind == kind and loaded.index.backend == backend
    pred2, nb2 = loaded.predict(q, 5, "inverse_square")
    np.testing.assert_array_equal(nb2.indices, nb.indices)
    np.testing.assert_allclose(pred2, pred, rtol=1e-6)
    # the method-state form (arrays + JSON) round-trips too
    again = ReferenceBank.from_state(bank.state_arrays(), bank.state_meta())
    np.testing.assert_array_equal(again.search(q, 5).indices, nb.indices)
    # not a bank
    with pytest.raises(He2stInputError, match="bank.json"):
        ReferenceBank.load(tmp_path)


@pytest.fixture(scope="module")
def cross_modal() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bank and queries driven by the same latent factors but offset from each other (a modality gap)."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 32))
    shift_b, shift_q = rng.normal(size=32) * 2, rng.normal(size=32) * 2

    def draw(n: int, shift: np.ndarray) -> np.ndarray:
        return (rng.normal(size=(n, 8)) @ w + 0.3 * rng.normal(size=(n, 32)) + shift).astype(np.float32)

    return draw(20000, shift_b), draw(1500, shift_q), draw(300, shift_q)


def test_ivf_cross_modal_calibration(cross_modal) -> None:
    """Calibrated on queries of the other modality, the IVF meets the target on new ones of it."""
    bank, train_q, test_q = cross_modal
    index = build_index(bank, "cosine", "ivf", k=20, target_recall=0.95, calibration_queries=train_q, seed=0)
    assert index.calibration.recall >= 0.95 and index.calibration.n_queries == 500  # n_calibration sampled
    exact = build_index(bank, "cosine", "exact")
    assert recall_at_k(index.search(test_q, 20).indices, exact.search(test_q, 20).indices) >= 0.93
    assert index.nprobe < index.describe()["params"]["nlist"]  # it did prune


def test_two_level_kmeans_cells_partition_the_bank(data, monkeypatch) -> None:
    """Large cell counts use two-level k-means; the cells still partition the bank and every
    row sits in the nearest cell among its nearest groups' cells (exact search at nprobe = nlist)."""
    from he2st.retrieval.search import ivf

    monkeypatch.setattr(ivf, "TWO_LEVEL_MIN_CELLS", 10)
    bank, q = data
    cent, order, offsets = ivf._kmeans_cells(bank, "l2", 60, seed=0)
    assert len(cent) == len(offsets) - 1 and abs(len(cent) - 60) <= 8
    assert offsets[-1] == len(bank) and sorted(order.tolist()) == list(range(len(bank)))
    # most rows are in their globally nearest cell (the two-level assignment looks at 4 groups)
    cell_of = np.empty(len(bank), dtype=np.int64)
    cell_of[order] = np.repeat(np.arange(len(cent)), np.diff(offsets))
    nearest = ((bank[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)
    assert (cell_of == nearest).mean() > 0.95
    # the faiss IVF over these cells: with every cell probed, exact search
    from he2st.retrieval.search import build

    monkeypatch.setattr(build, "TWO_LEVEL_MIN_CELLS", 10)
    index = build_index(bank, "l2", "ivf", nlist=60, k=10, target_recall=0.9, seed=0)
    index.nprobe = index.describe()["params"]["nlist"]
    np.testing.assert_array_equal(index.search(q, 10).indices, brute_force(bank, q, 10, "l2")[0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_two_level_cells_meet_target_recall(clustered, monkeypatch, metric) -> None:
    """The faiss IVF over two-level k-means cells (rows added pre-assigned), calibrated on held-out
    rows, meets the requested recall on new queries."""
    from he2st.retrieval.search import build, ivf

    monkeypatch.setattr(ivf, "TWO_LEVEL_MIN_CELLS", 10)
    monkeypatch.setattr(build, "TWO_LEVEL_MIN_CELLS", 10)
    bank, q = clustered
    nlist = len(bank) // 64
    index = build_index(bank, metric, "ivf", nlist=nlist, k=20, target_recall=0.9, seed=0)
    assert abs(index.describe()["params"]["nlist"] - nlist) <= 3 and index.calibration.recall >= 0.9
    assert index.index.ntotal == len(bank)
    truth = build_index(bank, metric, "exact").search(q, 20).indices
    assert recall_at_k(index.search(q, 20).indices, truth) >= 0.85
