"""Reference banks: embeddings, the expression they stand for, and where every row came from.

A :class:`ReferenceBank` is what a retrieval method predicts from. Rows are
grouped by slide, and the bank records each slide's id, patient and origin
(``"train"``: a training slide with image and expression; ``"validation"``: a
validation slide, likewise; ``"reference"``: an expression-only slide added
with ``reference_slides=``). That provenance is
what lets a method prove that no test spot is in its bank, and exclude a
test patient's slides at query time.

Banks are saved as a directory (``embeddings.npy``, ``values.npy``,
``bank.json`` and, for approximate indexes, ``index.faiss``) and can be
loaded memory-mapped, so a bank larger than RAM is searched chunk by chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_dir
from he2st.errors import He2stInputError
from he2st.retrieval.aggregation import aggregate
from he2st.retrieval.search import (
    FaissIndex,
    Index,
    Neighbors,
    build_index,
    check_metric,
)

BANK_FORMAT = "he2st.ReferenceBank"
ORIGINS = ("train", "validation", "reference")


class BankLeakageError(He2stInputError):
    """A query slide is part of the bank it is predicted from."""


@dataclass(frozen=True)
class BankSlide:
    """Provenance of one slide's block of rows.

    Parameters
    ----------
    slide_id
        Id of the slide.
    patient
        Patient of the slide.
    origin
        ``"train"`` (a training slide with image and expression),
        ``"validation"`` (a validation slide) or ``"reference"`` (an
        expression-only slide).
    start, stop
        The slide's rows are ``start:stop`` of the bank.
    """

    slide_id: str
    patient: str
    origin: str
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


class ReferenceBank:
    """Embeddings and expression of reference spots, with per-slide provenance.

    Parameters
    ----------
    embeddings
        ``(n, dim)`` float32 embeddings (expression embeddings for the
        retrieval methods).
    values
        ``(n, n_genes)`` float32 expression returned by retrieval.
    slides
        Provenance of contiguous row blocks, covering ``0..n`` in order.
    metric
        Retrieval metric: ``"cosine"``, ``"l2"`` or ``"l1"``.
    genes
        Column names of ``values``.

    Examples
    --------
    >>> bank = ReferenceBank.from_blocks([(emb_a, expr_a, "A1", "A", "train")], metric="l2")
    >>> bank.build_index("exact")
    >>> pred, nb = bank.predict(queries, k=50, aggregation="inverse_square")
    """

    def __init__(self, embeddings: Any, values: Any, slides: Sequence[BankSlide], metric: str = "cosine",
                 genes: Sequence[str] | None = None) -> None:
        self.metric = check_metric(metric)
        if embeddings.ndim != 2 or values.ndim != 2 or embeddings.shape[0] != values.shape[0]:
            raise He2stInputError(
                f"bank embeddings {embeddings.shape} and values {values.shape} must be 2-D with the same rows"
            )
        self.embeddings = embeddings
        self.values = values
        self.slides = list(slides)
        self.genes = list(genes) if genes is not None else None
        if self.genes is not None and len(self.genes) != values.shape[1]:
            raise He2stInputError(f"{len(self.genes)} gene names for {values.shape[1]} value columns")
        pos = 0
        seen: set[str] = set()
        for s in self.slides:
            if s.start != pos or s.stop < s.start:
                raise He2stInputError(f"bank slide blocks must be contiguous; {s.slide_id} starts at {s.start}, expected {pos}")
            if s.slide_id in seen:
                raise He2stInputError(f"slide {s.slide_id!r} appears twice in the bank")
            if s.origin not in ORIGINS:
                raise He2stInputError(f"bank origin must be one of {ORIGINS}, got {s.origin!r}")
            seen.add(s.slide_id)
            pos = s.stop
        if pos != embeddings.shape[0]:
            raise He2stInputError(f"bank slide blocks cover {pos} rows, the bank has {embeddings.shape[0]}")
        self.index: Index | None = None

    # -- construction ---------------------------------------------------
    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[np.ndarray, np.ndarray, str, str, str]], metric: str = "cosine",
                    genes: Sequence[str] | None = None) -> ReferenceBank:
        """Concatenate ``(embeddings, values, slide_id, patient, origin)`` blocks.

        Parameters
        ----------
        blocks
            One tuple per slide: ``(n_i, dim)`` embeddings, ``(n_i, n_genes)``
            expression, slide id, patient and origin (``"train"``,
            ``"validation"`` or ``"reference"``); rows are stored in block order.
        metric
            Retrieval metric: ``"cosine"``, ``"l2"`` or ``"l1"``.
        genes
            Column names of the expression.

        Returns
        -------
        ReferenceBank
            The bank, with float32 arrays and no index yet.

        Raises
        ------
        he2st.errors.He2stInputError
            When there are no blocks, a block's embeddings and expression differ
            in rows, or embeddings hold NaN or inf.
        """
        embs, vals, slides, pos = [], [], [], 0
        for emb, val, slide_id, patient, origin in blocks:
            emb = np.asarray(emb, dtype=np.float32)
            val = np.asarray(val, dtype=np.float32)
            if len(emb) != len(val):
                raise He2stInputError(f"slide {slide_id!r}: {len(emb)} embeddings for {len(val)} expression rows")
            if not np.isfinite(emb).all():
                raise He2stInputError(f"slide {slide_id!r}: embeddings contain NaN or inf")
            embs.append(emb)
            vals.append(val)
            slides.append(BankSlide(str(slide_id), str(patient), str(origin), pos, pos + len(emb)))
            pos += len(emb)
        if not embs:
            raise He2stInputError("a reference bank needs at least one slide")
        return cls(np.concatenate(embs), np.concatenate(vals), slides, metric, genes)

    # -- provenance -----------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.slides]

    @property
    def patients(self) -> list[str]:
        return sorted({s.patient for s in self.slides})

    def contains_slide(self, slide_id: str) -> bool:
        return any(s.slide_id == str(slide_id) for s in self.slides)

    def rows_of(self, slide_ids: Iterable[str] = (), patients: Iterable[str] = (), origins: Iterable[str] | None = None) -> np.ndarray:
        """Row ids of the given slides and/or patients (optionally only of some origins).

        Parameters
        ----------
        slide_ids
            Slides whose rows are wanted.
        patients
            Patients whose slides' rows are wanted.
        origins
            Keep only slides of these origins (default: every origin).

        Returns
        -------
        numpy.ndarray
            int64 row ids, in bank order (empty when nothing matches); usable
            as the ``exclude`` of :meth:`search`.
        """
        slide_ids, patients = {str(s) for s in slide_ids}, {str(p) for p in patients}
        origins = set(origins) if origins is not None else set(ORIGINS)
        parts = [np.arange(s.start, s.stop) for s in self.slides
                 if s.origin in origins and (s.slide_id in slide_ids or s.patient in patients)]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def check_not_in_bank(self, slide_id: str, what: str = "query") -> None:
        """Raise :class:`BankLeakageError` if ``slide_id`` contributed rows to the bank.

        Parameters
        ----------
        slide_id
            The query slide.
        what
            What is being done with it, for the error message.

        Raises
        ------
        BankLeakageError
            When the slide is in the bank.
        """
        if self.contains_slide(slide_id):
            raise BankLeakageError(
                f"slide {slide_id!r} is in the reference bank ({what} would retrieve its own spots); "
                f"bank slides: {self.slide_ids}"
            )

    def query_exclusions(self, slide_id: str, patient: str, *, on_overlap: str = "error",
                         exclude_patient: Any = "auto", train_patients: Iterable[str] = (),
                         what: str = "query") -> np.ndarray | None:
        """Bank rows a query slide may not retrieve: its own rows, and its patient's slides.

        The one leakage rule of every retrieval method (contrastive and exemplar-graph).

        Parameters
        ----------
        slide_id, patient
            The query slide and its patient.
        on_overlap
            ``"error"``: a query slide that is in the bank raises
            :class:`BankLeakageError`; ``"exclude"``: its rows are left out.
        exclude_patient
            True: leave out every bank slide of the query's patient, whatever its
            origin; ``"auto"``: only when no TRAINING slide is from that patient (a
            patient-level split); False: never.
        train_patients
            Patients of the training slides (for ``"auto"``).
        what
            What is being done, for the error message.

        Returns
        -------
        numpy.ndarray or None
            Sorted int64 row ids, or None when nothing is excluded.
        """
        parts = []
        if self.contains_slide(slide_id):
            if on_overlap == "error":
                self.check_not_in_bank(slide_id, what)
            parts.append(self.rows_of(slide_ids=[slide_id]))
        trained_on_patient = str(patient) in {str(t) for t in train_patients}
        if exclude_patient is True or (exclude_patient == "auto" and not trained_on_patient):
            parts.append(self.rows_of(patients=[patient]))
        rows = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        return rows if len(rows) else None

    # -- search ---------------------------------------------------------
    def build_index(self, kind: str = "exact", **kwargs: Any) -> Index:
        """Build (and keep) the search index; see :func:`he2st.retrieval.build_index`."""
        self.index = build_index(self.embeddings, self.metric, kind, **kwargs)
        return self.index

    def search(self, queries: Any, k: int, exclude: Any = None) -> Neighbors:
        """The ``k`` nearest bank rows of each query (an exact index is built if none is).

        Parameters
        ----------
        queries
            ``(n_queries, dim)`` embeddings.
        k
            Number of neighbours; capped at the number of eligible rows.
        exclude
            Bank rows that must not be returned: row ids (e.g. from
            :meth:`rows_of`) or a boolean mask of length ``n``.

        Returns
        -------
        Neighbors
            ``(n_queries, k)`` row ids and distances, nearest first.
        """
        if self.index is None:
            self.build_index("exact")
        assert self.index is not None
        return self.index.search(queries, k, exclude=exclude)

    def predict(self, queries: Any, k: int, aggregation: str = "mean", temperature: float = 1.0,
                exclude: Any = None) -> tuple[np.ndarray, Neighbors]:
        """Retrieve ``k`` neighbours per query and aggregate their ``values``.

        Parameters
        ----------
        queries
            ``(n_queries, dim)`` embeddings.
        k
            Number of neighbours per query.
        aggregation
            ``"mean"``, ``"inverse_square"`` or ``"softmax"``
            (see :mod:`he2st.retrieval.aggregation`).
        temperature
            Softmax temperature (``"softmax"`` only).
        exclude
            Bank rows that must not be retrieved (see :meth:`search`).

        Returns
        -------
        prediction : numpy.ndarray
            ``(n_queries, n_genes)`` float32 weighted average of the neighbours' values.
        neighbors : Neighbors
            The retrieved rows and their distances.
        """
        nb = self.search(queries, k, exclude=exclude)
        return aggregate(self.values, nb, aggregation, temperature), nb

    # -- persistence ----------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON metadata: format, metric, shapes, genes, slides and index."""
        return {
            "format": BANK_FORMAT,
            "version": 1,
            "metric": self.metric,
            "n": self.n,
            "dim": self.dim,
            "n_genes": int(self.values.shape[1]),
            "genes": self.genes,
            "slides": [s.__dict__ for s in self.slides],
            "index": self.index.describe() if self.index is not None else None,
        }

    def save(self, path: str | Path) -> Path:
        """Write the bank to a directory, atomically (a temporary directory renamed into place)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            _save_npy_chunked(tmp / "embeddings.npy", self.embeddings)
            _save_npy_chunked(tmp / "values.npy", self.values)
            meta = self.describe()
            if isinstance(self.index, FaissIndex) and self.index.kind != "exact":
                import faiss

                faiss.write_index(self.index.index, str(tmp / "index.faiss"))
                if self.index.id_map is not None:
                    np.save(tmp / "index_ids.npy", self.index.id_map)
            (tmp / "bank.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> ReferenceBank:
        """Load a saved bank; with ``mmap`` the arrays stay on disk and are read on demand.

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        mmap
            Memory-map the arrays (and a faiss IVF index) instead of reading them.

        Returns
        -------
        ReferenceBank
            The bank with its saved index restored (an exact index is rebuilt;
            none when none was saved).

        Raises
        ------
        he2st.errors.He2stInputError
            When the directory is not a saved bank or its arrays do not match
            ``bank.json``.
        """
        path = Path(path)
        meta_file = path / "bank.json"
        if not meta_file.is_file():
            raise He2stInputError(f"{path}: not a saved reference bank (no bank.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != BANK_FORMAT:
            raise He2stInputError(f"{meta_file}: format {meta.get('format')!r}, expected {BANK_FORMAT!r}")
        mode = "r" if mmap else None
        emb = np.load(path / "embeddings.npy", mmap_mode=mode, allow_pickle=False)
        val = np.load(path / "values.npy", mmap_mode=mode, allow_pickle=False)
        if emb.shape != (meta["n"], meta["dim"]) or val.shape != (meta["n"], meta["n_genes"]):
            raise He2stInputError(f"{path}: array shapes {emb.shape}, {val.shape} do not match bank.json")
        slides = [BankSlide(**s) for s in meta["slides"]]
        bank = cls(emb, val, slides, meta["metric"], meta.get("genes"))
        info = meta.get("index")
        if info and info["kind"] in ("ivf", "hnsw") and (path / "index.faiss").is_file():
            import faiss

            flags = faiss.IO_FLAG_MMAP if (mmap and info["kind"] == "ivf") else 0
            raw = faiss.read_index(str(path / "index.faiss"), flags)
            ids_file = path / "index_ids.npy"
            id_map = np.load(ids_file, allow_pickle=False) if ids_file.is_file() else None
            idx = FaissIndex(emb, bank.metric, raw, info["kind"], id_map)
            setting = info["params"].get("nprobe") if info["kind"] == "ivf" else info["params"].get("efSearch")
            idx.nprobe = setting if info["kind"] == "ivf" else None
            idx.ef_search = setting if info["kind"] == "hnsw" else None
            _restore_calibration(idx, info)
            bank.index = idx
        elif info and info["kind"] == "exact":
            bank.build_index("exact", backend=info.get("backend", "torch"))
        return bank

    # -- arrays for Method.get_state -----------------------------------
    def state_arrays(self, prefix: str = "bank.") -> dict[str, np.ndarray]:
        """Arrays (embeddings, values, serialised faiss index) for a method's safetensors state."""
        out = {prefix + "embeddings": np.ascontiguousarray(self.embeddings, dtype=np.float32),
               prefix + "values": np.ascontiguousarray(self.values, dtype=np.float32)}
        if isinstance(self.index, FaissIndex):
            out[prefix + "faiss"] = self.index.to_bytes()
            if self.index.id_map is not None:
                out[prefix + "faiss_ids"] = self.index.id_map
        return out

    def state_meta(self) -> dict[str, Any]:
        """JSON companion of :meth:`state_arrays`."""
        return {"metric": self.metric, "genes": self.genes, "slides": [s.__dict__ for s in self.slides],
                "index": self.index.describe() if self.index is not None else None}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any], prefix: str = "bank.") -> ReferenceBank:
        """Rebuild a bank from :meth:`state_arrays` and :meth:`state_meta`.

        Parameters
        ----------
        arrays
            Arrays of a method's state (may hold other keys).
        meta
            The JSON of :meth:`state_meta`.
        prefix
            Key prefix the arrays were written with.

        Returns
        -------
        ReferenceBank
            The bank with its index restored (an exact index is rebuilt).
        """
        bank = cls(np.asarray(arrays[prefix + "embeddings"]), np.asarray(arrays[prefix + "values"]),
                   [BankSlide(**s) for s in meta["slides"]], meta["metric"], meta.get("genes"))
        info = meta.get("index")
        if info and prefix + "faiss" in arrays:
            setting = info["params"].get("nprobe") if info["kind"] == "ivf" else info["params"].get("efSearch")
            bank.index = FaissIndex.from_bytes(arrays[prefix + "faiss"], bank.embeddings, bank.metric, info["kind"],
                                               setting, arrays.get(prefix + "faiss_ids"))
            _restore_calibration(bank.index, info)
        elif info:
            bank.build_index("exact", backend=info.get("backend", "torch"))
        return bank


def _save_npy_chunked(path: Path, arr: Any, chunk: int = 65536) -> None:
    """Write a 2-D array as .npy without materialising a memmap source in memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(arr.shape))
    for s in range(0, arr.shape[0], chunk):
        out[s : s + chunk] = np.asarray(arr[s : s + chunk], dtype=np.float32)
    out.flush()
    del out


def _restore_calibration(index: Index, info: dict[str, Any]) -> None:
    cal = info.get("calibration") or {}
    index.calibration.target_recall = cal.get("target_recall")
    index.calibration.k = cal.get("k")
    index.calibration.recall = cal.get("recall")
    index.calibration.n_queries = cal.get("n_queries", 0)
    index.calibration.tried = {int(a): b for a, b in (cal.get("tried") or {}).items()}
