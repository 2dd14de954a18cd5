"""Lazy, region-based image access.

:func:`open_image` returns a :class:`LazyImage` whose :meth:`~LazyImage.read_region`
touches only what it needs:

- TIFF / pyramidal TIFF (:mod:`.tiff`): tifffile decodes only the tiles (or
  strips) that overlap the region, with a small per-image LRU of decoded tiles;
  uncompressed, contiguous, untiled pages are memory-mapped.
- Vendor whole-slide formats (.svs, .ndpi, .mrxs, ...; :mod:`.openslide_backend`):
  OpenSlide (optional extra).
- JPEG / PNG / other Pillow formats (:mod:`.pil`): decoded once per process and
  kept in a byte-bounded LRU (:mod:`.cache`), because these formats have no
  random access; thumbnails of JPEGs never decode the full image.

Every read returns ``uint8 (h, w, 3)`` RGB. Grayscale, alpha, 16-bit and float
images are converted (:mod:`.pixels`), with one :class:`ImageConversionWarning`
per opened image that says exactly what was done. :mod:`.formats` detects the
format and reads image sizes from headers only.

Modules
-------
``image``              :class:`LazyImage` and :func:`open_image`
``formats``            format detection, header-only :func:`image_size`
``pixels``             :class:`~.pixels.PixelSpec`, conversion to RGB, resize
``cache``              byte-bounded LRU of decoded images and tiles
``base``               the backend interface
``tiff``, ``openslide_backend``, ``pil``   the three backends
"""

from __future__ import annotations

from he2st.image.lazy.cache import clear_image_cache  # noqa: F401 (re-export)
from he2st.image.lazy.formats import image_size  # noqa: F401 (re-export)
from he2st.image.lazy.image import LazyImage, open_image  # noqa: F401 (re-export)
from he2st.image.lazy.pixels import ImageConversionWarning  # noqa: F401 (re-export)

# No ``__all__``: :mod:`he2st.image` is the public face of these names (a second
# re-export would document each object twice).
