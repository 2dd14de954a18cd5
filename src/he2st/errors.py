"""Exceptions raised by he2st.

Every error that comes from bad user input is a :class:`He2stInputError` (a
``ValueError``) whose message names the file or slide at fault and says what
was expected, so that a user can act on it without reading a traceback.
"""

from __future__ import annotations


class He2stError(Exception):
    """Base class of every he2st error."""


class He2stInputError(He2stError, ValueError):
    """Input data (a file, a slide, a gene panel, a parameter) is not what was expected."""


class SlideError(He2stInputError):
    """A slide is malformed. The message starts with the slide id.

    Parameters
    ----------
    slide
        Id of the slide at fault, kept as :attr:`slide`; ``None`` when unknown
        (the message then has no ``slide '<id>': `` prefix).
    message
        What is wrong and what was expected.
    """

    def __init__(self, slide: str | None, message: str) -> None:
        self.slide = slide
        prefix = f"slide {slide!r}: " if slide else ""
        super().__init__(prefix + message)


class ImageError(He2stInputError):
    """An image file cannot be opened or is not an RGB histology image."""


class GenePanelError(He2stInputError):
    """A gene panel does not fit the slides it is applied to."""


class NotCountsError(He2stInputError):
    """A count-only operation was asked of a slide whose ``.X`` is not raw counts."""


class DiskFullError(He2stInputError, OSError):
    """A write ran out of disk space (or quota). The message names the folder and how to free it.

    Derives from ``OSError`` too, so code that handles disk errors still catches it.
    """


class RandomWeightsWarning(UserWarning):
    """A method computes its features with an encoder that was never trained (random initialisation)."""


class UnknownMppError(ImageError):
    """An image's microns per pixel is needed but neither the file nor the caller gives it."""


class InferredMppWarning(UserWarning):
    """Microns per pixel was not read from the file nor given: it was inferred from an assumption (spot lattice)."""


class MissingImageError(SlideError):
    """A method that predicts from the H&E image was given a slide without one.

    Parameters
    ----------
    slide
        Id of the slide at fault (see :class:`SlideError`).
    message
        What is wrong and what was expected.
    """


class MissingMppError(SlideError):
    """A slide's microns per pixel are unknown where a physical field of view needs them.

    Parameters
    ----------
    slide
        Id of the slide at fault (see :class:`SlideError`).
    message
        What is wrong and how to set the slide's mpp.
    """


class WeightsMismatchError(He2stInputError):
    """The encoder weights found now differ from those a model was trained on."""
