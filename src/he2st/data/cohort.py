"""A cohort: an ordered collection of slides with lookup by slide and patient."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from he2st.data.slide import meta, validate_slide
from he2st.errors import He2stInputError


class Cohort(Sequence):
    """Ordered, immutable collection of slide AnnData objects.

    Parameters
    ----------
    slides
        Slides following :mod:`he2st.data.slide`; slide ids must be unique.
    name
        Optional cohort name (e.g. ``"her2st"``), used in reports and cache keys.

    Examples
    --------
    >>> cohort = he2st.datasets.synthetic(n_slides=3)
    >>> cohort["syn0"].n_obs, cohort.slide_ids, cohort.patients
    """

    def __init__(self, slides: Iterable[Any], name: str = "cohort") -> None:
        self._slides = list(slides)
        self.name = name
        ids = [validate_slide(s).slide_id for s in self._slides]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise He2stInputError(f"cohort {name!r}: slide id {i!r} appears twice")
            seen.add(i)
        self._index = {i: k for k, i in enumerate(ids)}

    # Sequence protocol -------------------------------------------------
    def __len__(self) -> int:
        return len(self._slides)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._slides)

    def __getitem__(self, key: int | str | slice) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._slides[self._index[key]]
            except KeyError:
                raise KeyError(f"no slide {key!r} in cohort {self.name!r}; slides: {self.slide_ids}") from None
        if isinstance(key, slice):
            return Cohort(self._slides[key], name=self.name)
        return self._slides[key]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __repr__(self) -> str:
        n_spots = sum(s.n_obs for s in self._slides)
        return (
            f"Cohort({self.name!r}: {len(self)} slides, {len(self.patient_ids)} patients, "
            f"{n_spots} spots)"
        )

    # Lookups -----------------------------------------------------------
    @property
    def slide_ids(self) -> list[str]:
        """Slide ids in cohort order."""
        return list(self._index)

    @property
    def patients(self) -> dict[str, str]:
        """Mapping slide id -> patient id."""
        return {meta(s).slide_id: meta(s).patient for s in self._slides}

    @property
    def patient_ids(self) -> list[str]:
        """Distinct patient ids in order of first appearance."""
        return list(dict.fromkeys(self.patients.values()))

    def by_patient(self, patient: str) -> list[Any]:
        """Slides of one patient.

        Parameters
        ----------
        patient
            Patient id (see :attr:`patient_ids`).

        Returns
        -------
        list of anndata.AnnData
            The patient's slides, in cohort order.

        Raises
        ------
        KeyError
            No slide of the cohort belongs to ``patient``.
        """
        out = [s for s in self._slides if meta(s).patient == patient]
        if not out:
            raise KeyError(f"no patient {patient!r} in cohort {self.name!r}; patients: {self.patient_ids}")
        return out

    def subset(self, slide_ids: Iterable[str]) -> Cohort:
        """A new cohort with the named slides, in the order given.

        Parameters
        ----------
        slide_ids
            Ids of slides of this cohort.

        Returns
        -------
        Cohort
            The slides (the same objects, not copies), under this cohort's name.

        Raises
        ------
        KeyError
            An id is not in the cohort.
        """
        return Cohort([self[i] for i in slide_ids], name=self.name)

    def concat(self, join: str = "inner") -> Any:
        """Concatenate into one AnnData; ``obs["slide"]`` tells spots apart.

        Spot ids are suffixed ``_<slide>`` so they stay unique. Per-slide
        metadata goes to ``uns["he2st_slides"]``.

        Parameters
        ----------
        join
            How genes are combined, as in :func:`anndata.concat`: ``"inner"`` keeps
            the genes of every slide, ``"outer"`` their union (missing values 0).

        Returns
        -------
        anndata.AnnData
            All spots of the cohort, slide by slide.
        """
        import anndata as ad

        adatas = {meta(s).slide_id: s for s in self._slides}
        out = ad.concat(adatas, join=join, label="slide_key", index_unique="_", merge="same")
        out.obs["slide"] = out.obs["slide_key"].astype("category")
        del out.obs["slide_key"]
        out.uns["he2st_slides"] = {k: dict(v.uns["he2st"]) for k, v in adatas.items()}
        return out
