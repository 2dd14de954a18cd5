"""Train/validation/test splits of a cohort, by slide or by patient.

Spots of one slide are never split between training and test: neighbouring
spots share tissue and batch, so a spot-level split inflates every metric.
All splits here are lists of :class:`Fold` naming slide ids.

- :func:`leave_one_slide_out` -- the LOOCV of ST-Net, HisToGene, Hist2ST,
  Jiang et al. 2024 (the default);
- :func:`leave_one_patient_out` -- the stricter variant when a patient has
  several sections (her2st: 6 sections of patients A-D);
- :func:`kfold_by_slide` -- shuffled k folds of slides;
- :func:`nested_leave_one_out` -- outer leave-one-out, with an inner
  leave-one-out over each outer fold's training slides for model selection;
- :func:`named_split` -- a fixed split from a JSON or TOML file, e.g. the
  out-of-distribution split of Jiang et al. 2024 (train: 4 Swarbrick-lab
  Visium sections, validation: 2 others of that lab, test: the 10x Genomics
  sections)::

      # ood.toml
      train = ["1142243F", "1160920F", "CID4290", "CID4465"]
      validation = ["CID44971", "CID4535"]
      test = ["FFPE", "V1_Breast_Cancer_Block_A_Section_1", "V1_Breast_Cancer_Block_A_Section_2"]

  (the paper does not list which Swarbrick sections went to validation; the
  names above only illustrate the format). A file may also hold several folds:
  ``{"folds": [{"name": ..., "train": [...], "validation": [...], "test": [...]}]}``.

  What the validation slides are for is the fold's ``val_mode`` (file key
  ``validation_mode``): ``"score"`` -- the paper's protocol and the default of
  split files -- keeps them out of training and model selection and scores
  them as an in-distribution test next to the (out-of-distribution) test
  slides; ``"select"`` passes them to ``fit`` as ``val_slides``, where a
  method may pick its epoch on them (the default of folds built in code).

:func:`make_splits` turns a CLI spec (``loso``, ``lopo``, ``kfold:5``,
``nested``, or a file path) into folds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from he2st.errors import He2stInputError


class SplitError(He2stInputError):
    """A split is malformed or does not fit the cohort."""


#: What a fold's validation slides are for: picking the epoch ("select") or an in-distribution score ("score").
VALIDATION_MODES = ("select", "score")
#: Default ``val_mode`` of split files: Jiang et al. 2024 score their OOD split's validation slides, never tune on them.
FILE_VALIDATION_MODE = "score"


@dataclass(frozen=True)
class Fold:
    """One train/validation/test partition of slide ids.

    Parameters
    ----------
    name
        Fold label (e.g. the test slide for leave-one-slide-out); used in file names.
    train, val, test
        Slide ids. ``val`` may be empty.
    inner
        Inner folds over ``train`` (+ ``val``) for model selection (nested CV only).
    val_mode
        ``"select"``: ``val`` is passed to ``fit`` as ``val_slides`` (model
        selection); ``"score"``: ``val`` is kept from the method and scored
        as an in-distribution test (see :func:`he2st.evaluate.protocol.run_fold`).
    """

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    inner: tuple[Fold, ...] = field(default=())
    val_mode: str = "select"

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple(str(s) for s in self.train))
        object.__setattr__(self, "val", tuple(str(s) for s in self.val))
        object.__setattr__(self, "test", tuple(str(s) for s in self.test))
        object.__setattr__(self, "inner", tuple(self.inner))
        _check_fold(self, where=f"fold {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the inverse of :meth:`from_dict`).

        Returns
        -------
        dict
            ``name``, ``train``, ``validation``, ``test`` (lists of slide ids) and,
            for nested folds, ``inner`` (a list of such dicts).
        """
        d: dict[str, Any] = {
            "name": self.name,
            "train": list(self.train),
            "validation": list(self.val),
            "test": list(self.test),
        }
        if self.val:
            d["validation_mode"] = self.val_mode
        if self.inner:
            d["inner"] = [f.to_dict() for f in self.inner]
        return d

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], where: str = "split", default_name: str = "fold0", default_mode: str = "select"
    ) -> Fold:
        """Build a fold from ``{"name", "train", "validation"|"val", "test"}``.

        Parameters
        ----------
        d
            The fold's table: ``train`` and ``test`` lists of slide ids (required),
            ``validation`` or ``val`` (optional), ``name`` and ``inner`` (a list of
            such tables, for nested folds).
        where
            Where the table comes from, prefixed to error messages.
        default_name
            Name of the fold when ``d`` has none.
        default_mode
            ``val_mode`` when ``d`` has no ``validation_mode``.

        Returns
        -------
        Fold
            The checked fold.

        Raises
        ------
        SplitError
            Not a table, unknown keys, both ``validation`` and ``val``, a missing
            ``train`` or ``test`` list, or a slide in two parts of the fold.
        """
        if not isinstance(d, Mapping):
            raise SplitError(f"{where}: a fold must be a table/object, got {type(d).__name__}")
        unknown = set(d) - {"name", "train", "validation", "val", "test", "inner", "validation_mode"}
        if unknown:
            raise SplitError(
                f"{where}: unknown key(s) {sorted(unknown)}; expected train, validation, test (and name)"
            )
        if "validation" in d and "val" in d:
            raise SplitError(f"{where}: give either 'validation' or 'val', not both")
        for key in ("train", "test"):
            if key not in d:
                raise SplitError(f"{where}: missing the {key!r} list of slide ids")
        lists = {k: _id_list(d.get(k, []), f"{where}: {k!r}") for k in ("train", "test")}
        val = _id_list(d.get("validation", d.get("val", [])), f"{where}: 'validation'")
        name = str(d.get("name", default_name))
        inner = tuple(
            Fold.from_dict(x, where=f"{where} inner {i}", default_name=f"{name}-inner{i}")
            for i, x in enumerate(d.get("inner", []))
        )
        try:
            return cls(name, lists["train"], val, lists["test"], inner, str(d.get("validation_mode", default_mode)))
        except SplitError as exc:
            raise SplitError(f"{where}: {exc}") from None

    @property
    def slides(self) -> tuple[str, ...]:
        """All slide ids the fold touches (train, val, test)."""
        return self.train + self.val + self.test


def _id_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SplitError(f"{where} must be a list of slide ids, got {value!r}")
    out = []
    for v in value:
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise SplitError(f"{where}: slide ids must be strings, got {v!r}")
        out.append(str(v))
    return out


def _check_fold(fold: Fold, where: str) -> None:
    if fold.val_mode not in VALIDATION_MODES:
        raise SplitError(f"{where}: validation mode must be one of {VALIDATION_MODES}, got {fold.val_mode!r}")
    if not fold.train:
        raise SplitError(f"{where}: no training slides")
    for part, ids in (("train", fold.train), ("validation", fold.val), ("test", fold.test)):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        if dup:
            raise SplitError(f"{where}: slide(s) {dup} listed twice in {part}")
    for (pa, a), (pb, b) in (
        (("train", fold.train), ("test", fold.test)),
        (("train", fold.train), ("validation", fold.val)),
        (("validation", fold.val), ("test", fold.test)),
    ):
        both = sorted(set(a) & set(b))
        if both:
            raise SplitError(f"{where}: slide(s) {both} are in both {pa} and {pb}")
    for inner in fold.inner:
        outside = sorted(set(inner.slides) - set(fold.train + fold.val))
        if outside:
            raise SplitError(f"{where}: inner fold {inner.name!r} uses slide(s) {outside} outside the outer training set")


def validate_folds(folds: Sequence[Fold], slide_ids: Iterable[str], where: str = "split") -> list[Fold]:
    """Check that every slide a fold names is in the cohort, and fold names are unique.

    Inner folds are checked too.

    Parameters
    ----------
    folds
        The folds.
    slide_ids
        Slide ids of the cohort.
    where
        Where the folds come from, prefixed to error messages.

    Returns
    -------
    list of Fold
        ``folds``, unchanged.

    Raises
    ------
    SplitError
        Naming the unknown slide and the fold.
    """
    known = list(slide_ids)
    known_set = set(known)
    names: set[str] = set()
    for f in folds:
        if f.name in names:
            raise SplitError(f"{where}: two folds are named {f.name!r}")
        names.add(f.name)
        for part, ids in (("train", f.train), ("validation", f.val), ("test", f.test)):
            unknown = [s for s in ids if s not in known_set]
            if unknown:
                raise SplitError(
                    f"{where}: fold {f.name!r} {part} names slide(s) {unknown} that are not in the cohort "
                    f"(slides: {known})"
                )
        validate_folds(f.inner, known, where=f"{where}: fold {f.name!r}")
    return list(folds)


# -- generators -------------------------------------------------------------------


def _slide_ids(slides: Any) -> list[str]:
    """Slide ids of a Cohort, a list of slides, or a list of ids."""
    if hasattr(slides, "slide_ids"):
        return list(slides.slide_ids)
    out = []
    for s in slides:
        if isinstance(s, str):
            out.append(s)
        else:
            from he2st.data.slide import meta

            out.append(meta(s).slide_id)
    if len(set(out)) != len(out):
        raise SplitError(f"slide ids are not unique: {out}")
    return out


def _patients(slides: Any, patients: Mapping[str, str] | None) -> dict[str, str]:
    if patients is not None:
        return {str(k): str(v) for k, v in patients.items()}
    if hasattr(slides, "patients"):
        return dict(slides.patients)
    if all(not isinstance(s, str) for s in slides):
        from he2st.data.slide import meta

        return {meta(s).slide_id: meta(s).patient for s in slides}
    raise SplitError("leave_one_patient_out needs slides with metadata, or a slide -> patient mapping")


def leave_one_slide_out(slides: Any) -> list[Fold]:
    """One fold per slide: test on it, train on all others.

    Parameters
    ----------
    slides
        A :class:`~he2st.data.cohort.Cohort`, a list of slides, or a list of slide ids.

    Returns
    -------
    list of Fold
        One fold per slide, named after its test slide, in slide order.

    Raises
    ------
    SplitError
        Fewer than 2 slides.
    """
    ids = _slide_ids(slides)
    if len(ids) < 2:
        raise SplitError(f"leave-one-slide-out needs at least 2 slides, got {ids}")
    return [Fold(s, tuple(x for x in ids if x != s), (), (s,)) for s in ids]


def leave_one_patient_out(slides: Any, patients: Mapping[str, str] | None = None) -> list[Fold]:
    """One fold per patient: test on all its slides, train on the other patients'.

    Parameters
    ----------
    slides
        A cohort, slides, or slide ids (then ``patients`` is required).
    patients
        Optional mapping slide id -> patient id (default: from the slides' metadata).

    Returns
    -------
    list of Fold
        One fold ``patient-<id>`` per patient, in order of first appearance.

    Raises
    ------
    SplitError
        A slide without a patient, or fewer than 2 patients.
    """
    ids = _slide_ids(slides)
    pat = _patients(slides, patients)
    missing = [s for s in ids if s not in pat]
    if missing:
        raise SplitError(f"no patient given for slide(s) {missing}")
    order = list(dict.fromkeys(pat[s] for s in ids))
    if len(order) < 2:
        raise SplitError(f"leave-one-patient-out needs at least 2 patients, got {order}")
    return [
        Fold(f"patient-{p}", tuple(s for s in ids if pat[s] != p), (), tuple(s for s in ids if pat[s] == p))
        for p in order
    ]


def kfold_by_slide(slides: Any, k: int = 5, seed: int = 0) -> list[Fold]:
    """``k`` folds of whole slides, shuffled with ``seed`` (sizes differ by at most one).

    Parameters
    ----------
    slides
        A cohort, a list of slides, or a list of slide ids.
    k
        Number of folds.
    seed
        Seed of the shuffle.

    Returns
    -------
    list of Fold
        Folds ``fold0`` ... ``fold<k-1>``; every slide is tested exactly once.

    Raises
    ------
    SplitError
        ``k < 2`` or more folds than slides.
    """
    ids = _slide_ids(slides)
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise SplitError(f"kfold_by_slide: k must be an integer >= 2, got {k!r}")
    if k > len(ids):
        raise SplitError(f"kfold_by_slide: k={k} folds but only {len(ids)} slides")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, k)
    folds = []
    for i, part in enumerate(parts):
        test = [ids[j] for j in sorted(part)]
        folds.append(Fold(f"fold{i}", tuple(s for s in ids if s not in test), (), tuple(test)))
    return folds


def nested_leave_one_out(slides: Any, group: str = "slide", patients: Mapping[str, str] | None = None) -> list[Fold]:
    """Outer leave-one-out folds, each with inner leave-one-out folds over its training slides.

    Model selection (hyper-parameters, early stopping epoch) uses only the inner
    folds, so the outer test slide is never consulted. Outer folds with a single
    training slide have no inner folds.

    Parameters
    ----------
    slides
        A cohort, a list of slides, or a list of slide ids.
    group
        ``"slide"`` (default) or ``"patient"``: the unit left out, outer and inner.
    patients
        Mapping slide id -> patient id for ``group="patient"`` (default: from the
        slides' metadata).

    Returns
    -------
    list of Fold
        The outer folds, each with its inner folds in :attr:`Fold.inner`.

    Raises
    ------
    SplitError
        An unknown ``group``, or too few slides or patients.
    """
    ids = _slide_ids(slides)
    if group == "slide":
        pat = {s: s for s in ids}
        outer = leave_one_slide_out(ids)
    elif group == "patient":
        pat = _patients(slides, patients)
        outer = leave_one_patient_out(ids, pat)
    else:
        raise SplitError(f"nested_leave_one_out: group must be 'slide' or 'patient', got {group!r}")
    out = []
    for f in outer:
        inner: list[Fold] = []
        if len({pat[s] for s in f.train}) >= 2:
            sub = list(f.train)
            inner = leave_one_slide_out(sub) if group == "slide" else leave_one_patient_out(sub, pat)
        inner = [Fold(f"{f.name}-inner-{i.name}", i.train, i.val, i.test) for i in inner]
        out.append(Fold(f.name, f.train, f.val, f.test, tuple(inner)))
    return out


def named_split(path: str | Path, slides: Any = None, validation: str | None = None) -> list[Fold]:
    """Read a fixed split from a JSON or TOML file.

    The file holds either one fold (``train``, ``validation`` (or ``val``),
    ``test`` lists of slide ids, optional ``name`` and ``validation_mode``)
    or several under ``folds`` (a top-level ``validation_mode`` applies to
    every fold that gives none).

    Parameters
    ----------
    path
        ``.json`` or ``.toml`` file.
    slides
        Optional cohort/slides/ids: every slide named must be one of them.
    validation
        ``"score"`` or ``"select"`` for every fold, overriding the file; None:
        the file's ``validation_mode``, else ``"score"`` (Jiang et al.'s
        out-of-distribution protocol: the validation slides are an
        in-distribution test, not used for tuning).

    Returns
    -------
    list of Fold
        The folds of the file, in its order.

    Raises
    ------
    SplitError
        Unreadable or malformed file, unknown slide (named), a slide in both
        train and test, empty train or test.
    """
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            raise SplitError(f"split file {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, SplitError):
            raise
        raise SplitError(f"split file {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, Mapping):
        raise SplitError(f"split file {path}: top level must be a table/object")
    where = f"split file {path}"
    mode = str(data.get("validation_mode", FILE_VALIDATION_MODE)) if "folds" in data else FILE_VALIDATION_MODE
    if "folds" in data:
        extra = set(data) - {"folds", "name", "validation_mode"}
        if extra:
            raise SplitError(f"{where}: unexpected key(s) {sorted(extra)} next to 'folds'")
        if not isinstance(data["folds"], Sequence) or not data["folds"]:
            raise SplitError(f"{where}: 'folds' must be a non-empty list")
        folds = [
            Fold.from_dict(d, where=f"{where} fold {i}", default_name=f"fold{i}", default_mode=mode)
            for i, d in enumerate(data["folds"])
        ]
    else:
        folds = [Fold.from_dict(data, where=where, default_name=path.stem, default_mode=mode)]
    if validation is not None:
        folds = with_validation(folds, validation)
    for f in folds:
        if not f.test:
            raise SplitError(f"{where}: fold {f.name!r} has no test slides")
    if slides is not None:
        validate_folds(folds, _slide_ids(slides), where=where)
    return folds


def with_validation(folds: Sequence[Fold], validation: str) -> list[Fold]:
    """The folds with their validation slides used as ``validation`` says.

    Parameters
    ----------
    folds
        Folds to change.
    validation
        ``"select"`` (passed to ``fit`` for model selection) or ``"score"``
        (kept from the method and scored as an in-distribution test).

    Returns
    -------
    list of Fold
        Copies with ``val_mode = validation``.

    Raises
    ------
    SplitError
        An unknown mode.
    """
    if validation not in VALIDATION_MODES:
        raise SplitError(f"validation must be one of {VALIDATION_MODES}, got {validation!r}")
    return [replace(f, val_mode=validation) for f in folds]


def make_splits(
    spec: str | Path | Sequence[Fold], slides: Any, seed: int = 0, validation: str | None = None
) -> list[Fold]:
    """Folds from a spec: a named scheme, a split file, or a list of folds.

    Every fold is checked against the cohort's slide ids.

    Parameters
    ----------
    spec
        ``loso`` (default; also ``""``), ``lopo``, ``kfold:K`` (``kfold``: K = 5),
        ``nested`` (``nested:slide``), ``nested:patient``, a ``.json``/``.toml``
        split file (see :func:`named_split`), or a list of :class:`Fold`.
    slides
        A cohort, a list of slides, or a list of slide ids.
    seed
        Seed of the ``kfold`` shuffle.
    validation
        ``"select"`` or ``"score"`` for every fold's validation slides; None
        keeps each fold's own (``"score"`` for split files, see
        :func:`named_split`; ``"select"`` otherwise).

    Returns
    -------
    list of Fold
        The validated folds.

    Raises
    ------
    SplitError
        An unknown spec, or folds that do not fit the cohort.
    """
    ids = _slide_ids(slides)
    if isinstance(spec, (list, tuple)):
        return validate_folds(list(spec) if validation is None else with_validation(spec, validation), ids)
    s = str(spec).strip()
    low = s.lower()
    if low in ("loso", "leave-one-slide-out", ""):
        folds = leave_one_slide_out(slides)
    elif low in ("lopo", "leave-one-patient-out"):
        folds = leave_one_patient_out(slides)
    elif low.startswith("kfold"):
        _, _, k = low.partition(":")
        try:
            kk = int(k) if k else 5
        except ValueError:
            raise SplitError(f"split spec {s!r}: expected kfold:K with an integer K") from None
        folds = kfold_by_slide(slides, kk, seed=seed)
    elif low in ("nested", "nested:slide"):
        folds = nested_leave_one_out(slides)
    elif low == "nested:patient":
        folds = nested_leave_one_out(slides, group="patient")
    elif low.endswith((".json", ".toml")) or Path(s).exists():
        folds = named_split(s)
    else:
        raise SplitError(
            f"unknown split {s!r}: expected loso, lopo, kfold:K, nested, nested:patient or a .json/.toml file"
        )
    if validation is not None:
        folds = with_validation(folds, validation)
    return validate_folds(folds, ids)
