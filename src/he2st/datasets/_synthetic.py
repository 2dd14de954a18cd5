"""A synthetic H&E + spatial-transcriptomics cohort whose expression is learnable from the image.

Every test and demo in he2st needs a cohort that builds in seconds, without
data files, on which a model that reads the image really beats one that does
not. :func:`synthetic` draws one:

*Image.* Each slide is an RGB image made with the Beer-Lambert stain model
(optical density = hematoxylin x H-vector + eosin x E-vector, the model
behind colour deconvolution and Macenko stain normalisation). Tissue is an irregular blob on white glass.
It is divided into four region types laid out as smooth random blobs:

=========  ==============================================================
tumor      dense, large, dark, slightly oval nuclei; moderate eosin
immune     very dense, small, round, very dark nuclei; little eosin
stroma     sparse elongated nuclei along a flow field; eosin-rich pink
adipose    white fat cells with thin pink membranes; few nuclei
=========  ==============================================================

Within a region, nuclear density, nucleus size and hematoxylin intensity are
modulated by smooth random fields, so morphology varies continuously. Each
slide also gets its own small stain-vector and intensity perturbation (a
batch effect), and is a different patient.

*Spots* lie on a Visium-like hexagonal grid: pitch ``patch_px`` pixels
(= 100 um, so ``mpp = 100 / patch_px``), spot diameter ``0.55 * pitch``,
``array_col`` even/odd by row as in Visium.

*Counts.* The morphology actually drawn in the ``patch_px`` square around each
spot is measured from the rendered stain maps: nuclear area fraction, mean
nucleus area, mean nuclear hematoxylin, mean eosin, white (glass/fat) fraction,
and the fraction of each region. For gene ``g`` and spot ``s``::

    log mu[s, g] = b[g] + sum_k W[g, k] z[s, k] + sum_j V[g, j] F_j(s) + l[s]
    counts[s, g] ~ NegativeBinomial(mean mu[s, g], dispersion theta[g])

with ``z`` the standardised morphology features, ``W`` sparse gene loadings
shared by all slides (about 10% of genes load on no feature at all and are not
predictable from the image), ``F_j`` three smooth spatial fields per slide
(invisible in the image), and ``l`` a per-spot log library size. ``W``,
``b`` and ``theta`` depend on ``seed`` only, so every slide follows the same
biology.

The true mean ``mu`` is stored in ``obsm["true_mean"]`` for tests of the
generator itself; :func:`synthetic_truth` gives the noise-free mean (without the
per-spot library noise) at any pixel position, e.g. on a grid read with
:func:`he2st.io.read_image`. No method may read it: methods see ``.X``, the image and the
coordinates only.

Images (PNG, or tiled TIFF above 4096 px) and counts are cached under
``default_cache_dir() / "synthetic" / <hash of the parameters>/`` (written
atomically, reused on the next call). The same parameters give identical
counts and identical image bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from he2st._utils import atomic_path, atomic_write_json, default_cache_dir

#: Bump when the drawing or the expression model changes: it is part of the cache key.
GENERATOR_VERSION = 1

REGIONS = ("tumor", "immune", "stroma", "adipose")

#: Morphology features the expression depends on, in the column order of ``W``.
FEATURES = (
    "nuclear_fraction",
    "nucleus_area",
    "hematoxylin",
    "eosin",
    "white_fraction",
    "frac_tumor",
    "frac_immune",
    "frac_stroma",
    "frac_adipose",
)

# Per-region drawing parameters, lengths relative to the spot pitch P:
# nuclei per P^2, nucleus semi-major axis / P, aspect ratio, hematoxylin, eosin, region prior.
_REGION_PARAMS = {
    "tumor": dict(density=40.0, radius=0.085, aspect=1.35, hema=1.05, eosin=0.35, prior=0.3),
    "immune": dict(density=60.0, radius=0.05, aspect=1.05, hema=1.45, eosin=0.22, prior=-0.2),
    "stroma": dict(density=8.0, radius=0.065, aspect=2.8, hema=0.85, eosin=0.70, prior=0.3),
    "adipose": dict(density=2.5, radius=0.05, aspect=1.8, hema=0.8, eosin=0.04, prior=-0.4),
}

# Hand-set centring/scaling of the features (fixed, so that a slide's overall
# morphology matters and is not standardised away per slide).
_FEATURE_CENTER = np.array([0.12, 0.025, 1.0, 0.4, 0.15, 0.25, 0.2, 0.35, 0.2])
_FEATURE_SCALE = np.array([0.08, 0.012, 0.2, 0.15, 0.2, 0.4, 0.4, 0.45, 0.4])

# Stain optical-density vectors: the H&E reference of Macenko et al. (as used by
# torchstain/StainTools), which gives more natural pinks than Ruifrok's eosin.
_H_VEC = np.array([0.5626, 0.7201, 0.4062])
_E_VEC = np.array([0.2159, 0.8012, 0.5581])
_GLASS = np.array([243.0, 242.0, 246.0])

_PNG_MAX_SIDE = 4096


def synthetic(
    n_slides: int = 4,
    n_spots: int = 300,
    n_genes: int = 50,
    patch_px: int = 32,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> Any:
    """Build (or load from the cache) a synthetic cohort; see the module docstring.

    Parameters
    ----------
    n_slides
        Number of slides, each from its own patient (``P0``, ``P1``, ...).
    n_spots
        Spots per slide.
    n_genes
        Number of genes, named ``GENE000``, ``GENE001``, ...
    patch_px
        Spot pitch in pixels; the natural patch size for models.
    seed
        Random seed. Slide ``k`` depends only on ``(seed, k)`` and the sizes,
        so adding slides does not change the first ones.
    root
        Cache folder used instead of ``default_cache_dir() / "synthetic"``.

    Returns
    -------
    he2st.data.Cohort
        Slides ``syn0``, ``syn1``, ... with raw counts, ``obs["label"]`` (region
        at the spot), ``obsm["spatial"]``, ``obsm["true_mean"]`` and an image file.

    Examples
    --------
    >>> cohort = he2st.datasets.synthetic(n_slides=3, seed=1)
    >>> cohort["syn0"].obs["label"].value_counts()
    """
    from he2st.data.cohort import Cohort
    from he2st.errors import He2stInputError

    limits = (("n_slides", n_slides, 1), ("n_spots", n_spots, 10), ("n_genes", n_genes, 2), ("patch_px", patch_px, 8))
    for name, value, lo in limits:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
            raise He2stInputError(f"synthetic: {name} must be an integer >= {lo}, got {value!r}")
    params = {
        "n_spots": int(n_spots),
        "n_genes": int(n_genes),
        "patch_px": int(patch_px),
        "seed": int(seed),
        "version": GENERATOR_VERSION,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    folder = (Path(root) if root is not None else default_cache_dir() / "synthetic") / key
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "params.json").exists():
        atomic_write_json(folder / "params.json", params)
    genes = _gene_model(params)
    slides = [_slide(k, params, genes, folder) for k in range(int(n_slides))]
    return Cohort(slides, name="synthetic")


# -- per-slide build / cache ------------------------------------------------------


def _slide(k: int, params: dict[str, Any], genes: dict[str, np.ndarray], folder: Path) -> Any:
    from he2st.data.slide import make_slide

    sid = f"syn{k}"
    tiff_path = folder / f"{sid}.tif"
    image_path = tiff_path if tiff_path.exists() else folder / f"{sid}.png"
    arrays_path = folder / f"{sid}.npz"
    if not (image_path.exists() and arrays_path.exists()):
        rgb, arrays = _draw_slide(k, params, genes)
        # PNG has no random access: large images go to a tiled TIFF that is read tile by tile.
        image_path = tiff_path if max(rgb.shape[:2]) > _PNG_MAX_SIDE else folder / f"{sid}.png"
        _write_image(image_path, rgb)
        with atomic_path(arrays_path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    with np.load(arrays_path, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    P = params["patch_px"]
    rows, cols = arrays["array_row"], arrays["array_col"]
    h, w = (int(v) for v in arrays["image_hw"])
    adata = make_slide(
        arrays["counts"],
        [f"{r}x{c}" for r, c in zip(rows, cols)],
        [f"GENE{g:03d}" for g in range(params["n_genes"])],
        arrays["spatial"],
        slide_id=sid,
        patient=f"P{k}",
        image_path=str(image_path),
        spot_diameter_px=0.55 * P,
        mpp=100.0 / P,
        array_row=rows,
        array_col=cols,
        labels=[REGIONS[i] for i in arrays["label"]],
        counts=True,
        source=f"he2st.datasets.synthetic(seed={params['seed']}, n_spots={params['n_spots']}, "
        f"n_genes={params['n_genes']}, patch_px={P}) slide {k}",
        image_size=(w, h),
    )
    adata.obsm["true_mean"] = arrays["true_mean"].astype(np.float32)
    adata.uns["he2st_synthetic"] = {**params, "slide_index": k, "features": list(FEATURES)}
    return adata


def _write_image(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".png":
            from PIL import Image

            Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)
        else:
            import tifffile

            tifffile.imwrite(tmp, rgb, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None)


# -- gene model (shared by all slides) -----------------------------------------------


def _gene_model(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Baselines, morphology loadings, spatial loadings and dispersions of the genes."""
    rng = np.random.default_rng([params["seed"], 0, GENERATOR_VERSION])
    G, K = params["n_genes"], len(FEATURES)
    base = rng.normal(np.log(6.0), 0.7, size=G)
    W = np.zeros((G, K))
    for g in range(G):
        n_load = rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])
        ks = rng.choice(K, size=n_load, replace=False)
        W[g, ks] = rng.choice([-1.0, 1.0], size=n_load) * rng.uniform(0.35, 0.8, size=n_load)
    # ~10% of the genes follow no morphology at all: their image-based PCC should be ~0.
    W[rng.random(G) < 0.1] = 0.0
    V = rng.normal(0.0, 0.25, size=(G, 3))
    theta = rng.uniform(4.0, 20.0, size=G)
    return {"base": base, "W": W, "V": V, "theta": theta}


# -- drawing ----------------------------------------------------------------------


def _smooth_fields(rng: np.random.Generator, n: int, h: int, w: int, scale: float) -> np.ndarray:
    """``n`` smooth random fields of shape (h, w), unit variance, correlation length ~``scale`` px.

    Gaussian-smoothed white noise on a grid of ``scale / 8`` px cells, upsampled
    bilinearly (separably, so it costs two gathers per pixel). The cells are
    small next to the correlation length, so the interpolation leaves no
    visible facets on region borders.
    """
    from scipy.ndimage import gaussian_filter

    step = max(scale / 8.0, 1.0)
    gh, gw = int(np.ceil(h / step)) + 2, int(np.ceil(w / step)) + 2
    grid = gaussian_filter(rng.standard_normal((n, gh, gw)), sigma=(0, 4.0, 4.0), mode="wrap").astype(np.float32)
    ty, tx = np.arange(h) / step, np.arange(w) / step
    y0, x0 = ty.astype(int), tx.astype(int)
    wy, wx = (ty - y0).astype(np.float32)[None, :, None], (tx - x0).astype(np.float32)
    rows = grid[:, y0] * (1 - wy) + grid[:, y0 + 1] * wy  # (n, h, gw)
    out = rows[:, :, x0] * (1 - wx) + rows[:, :, x0 + 1] * wx  # (n, h, w)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-12
    return out


def _hex_grid(rng: np.random.Generator, n_spots: int, P: float) -> dict[str, Any]:
    """Candidate grid ~1.8x larger than needed, and the image frame around it."""
    aspect = rng.uniform(0.8, 1.25)
    row_step = P * np.sqrt(3.0) / 2.0
    n_grid = 1.8 * n_spots
    n_rows = max(int(np.ceil(np.sqrt(n_grid / (aspect * np.sqrt(3.0) / 2.0)))), 3)
    n_cols = max(int(np.ceil(n_grid / n_rows)), 3)
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    margin = 1.5 * P
    x = margin + c * P + (r % 2) * P / 2.0
    y = margin + r * row_step
    w = int(np.ceil(x.max() + margin))
    h = int(np.ceil(y.max() + margin))
    return {"row": r, "col": 2 * c + (r % 2), "x": x, "y": y, "h": h, "w": w}


def _draw_slide(
    k: int, params: dict[str, Any], genes: dict[str, np.ndarray], keep: dict[str, Any] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw slide ``k``: returns the RGB image and the arrays cached next to it.

    ``keep``, when given, receives the maps the expression is computed from
    (for :func:`synthetic_truth`); the draw itself is the same either way.
    """
    rng = np.random.default_rng([params["seed"], 1, k, GENERATOR_VERSION])
    P = float(params["patch_px"])
    grid = _hex_grid(rng, params["n_spots"], P)
    h, w = grid["h"], grid["w"]

    # Smooth fields: tissue shape, 4 region scores, density / size / hematoxylin / eosin
    # modulation, fibre direction, 3 expression-only fields.
    f = _smooth_fields(rng, 13, h, w, scale=4.0 * P)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2.0, h / 2.0
    ellipse = ((xx - cx) / (0.5 * w)) ** 2 + ((yy - cy) / (0.5 * h)) ** 2
    tissue_score = -2.5 * ellipse + 0.45 * f[0]

    # Spots: the n_spots grid points deepest in the tissue blob.
    gy = np.clip(np.round(grid["y"]).astype(int), 0, h - 1)
    gx = np.clip(np.round(grid["x"]).astype(int), 0, w - 1)
    order = np.argsort(-tissue_score[gy, gx], kind="stable")[: params["n_spots"]]
    order = np.sort(order)
    thr = tissue_score[gy[order], gx[order]].min()
    tissue = tissue_score >= thr - 0.35  # a rim of tissue beyond the outermost spots

    prior = np.array([_REGION_PARAMS[r]["prior"] for r in REGIONS], dtype=np.float32)
    region = np.argmax(f[1:5] + prior[:, None, None], axis=0).astype(np.int8)

    keys = ("density", "radius", "aspect", "hema", "eosin")
    reg = {key: np.array([_REGION_PARAMS[r][key] for r in REGIONS]) for key in keys}
    nuclei = _place_nuclei(rng, region, tissue, f, reg, P)
    H, cover = _stamp_nuclei(nuclei, h, w)

    # Eosin: region level, smooth modulation, fine texture; fat cells get membranes.
    E = reg["eosin"][region].astype(np.float32) * np.exp(0.25 * f[8])
    E *= 1.0 + 0.12 * rng.standard_normal((h, w)).astype(np.float32)
    fat = (region == 3) & tissue
    E[fat] = 0.03 + _membranes(rng, fat, P)[fat] * 0.6
    E = np.where(tissue, E, 0.0).astype(np.float32)
    H = np.where(tissue, H + 0.06, H).astype(np.float32)  # faint hematoxylin counterstain of tissue
    H *= 1.0 + 0.1 * rng.standard_normal((h, w)).astype(np.float32)

    rgb = _render(rng, H, E, tissue)

    # Morphology in the patch around each spot, measured on what was drawn.
    sx, sy = grid["x"][order], grid["y"][order]
    feats, frac = _spot_features(nuclei, H, E, cover, region, tissue, sx, sy, P)
    z = (feats - _FEATURE_CENTER) / _FEATURE_SCALE
    spatial_fields = f[10:13][:, gy[order], gx[order]].T  # (n, 3), invisible in the image
    lib_spot = rng.normal(0.0, 0.25, size=len(order))
    lib_slide = rng.normal(0.0, 0.15)
    lib = lib_spot + lib_slide
    if keep is not None:
        keep.update(
            nuclei=nuclei, H=H, E=E, cover=cover, region=region, tissue=tissue, fields=f[10:13], lib_slide=lib_slide
        )
    log_mu = genes["base"][None, :] + z @ genes["W"].T + spatial_fields @ genes["V"].T + lib[:, None]
    mu = np.exp(np.clip(log_mu, -10.0, 9.0))
    theta = genes["theta"][None, :]
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.int32)

    arrays = {
        "counts": counts,
        "true_mean": mu.astype(np.float32),
        "spatial": np.column_stack([sx, sy]).astype(np.float64),
        "array_row": grid["row"][order].astype(np.int64),
        "array_col": grid["col"][order].astype(np.int64),
        "label": np.argmax(frac, axis=1).astype(np.int64),
        "features": feats.astype(np.float32),
        "image_hw": np.array([h, w], dtype=np.int64),
    }
    return rgb, arrays


def _place_nuclei(
    rng: np.random.Generator,
    region: np.ndarray,
    tissue: np.ndarray,
    f: np.ndarray,
    reg: dict[str, np.ndarray],
    P: float,
) -> dict[str, np.ndarray]:
    """Nucleus centres, axes, angles and hematoxylin by thinning a uniform Poisson process."""
    h, w = region.shape
    dens_mod = np.exp(0.45 * f[5])
    dens = reg["density"][region] / (P * P) * dens_mod * tissue
    lam_max = float(dens.max())
    n = rng.poisson(lam_max * h * w)
    x = rng.uniform(0, w, n)
    y = rng.uniform(0, h, n)
    ix, iy = np.minimum(x.astype(int), w - 1), np.minimum(y.astype(int), h - 1)
    keep = rng.random(n) * lam_max < dens[iy, ix]
    x, y, ix, iy = x[keep], y[keep], ix[keep], iy[keep]
    r = region[iy, ix]
    m = len(x)
    a = reg["radius"][r] * P * np.exp(0.3 * f[6][iy, ix] + 0.12 * rng.standard_normal(m))
    a = np.clip(a, 0.8, 0.3 * P)
    aspect = reg["aspect"][r] * np.exp(0.15 * rng.standard_normal(m))
    b = np.maximum(a / np.maximum(aspect, 1.0), 0.6)
    # Stromal nuclei follow a smooth fibre direction; the others are randomly oriented.
    angle = np.where(r == 2, np.pi * f[9][iy, ix], rng.uniform(0, np.pi, m))
    hema = reg["hema"][r] * np.exp(0.22 * f[7][iy, ix] + 0.1 * rng.standard_normal(m))
    return {"x": x, "y": y, "a": a, "b": b, "angle": angle, "hema": hema}


def _stamp_nuclei(nuclei: dict[str, np.ndarray], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise ellipses with anti-aliased edges; returns (hematoxylin, coverage) maps.

    Vectorised per chunk of similar-sized nuclei: every nucleus in a chunk is
    evaluated on the same (2R+1)^2 window of offsets, then written with
    ``np.maximum.at`` so overlapping nuclei keep the darker value.
    """
    H = np.zeros(h * w, dtype=np.float32)
    cover = np.zeros(h * w, dtype=np.float32)
    order = np.argsort(nuclei["a"], kind="stable")
    for start in range(0, len(order), 4096):
        idx = order[start : start + 4096]
        R = int(np.ceil(nuclei["a"][idx].max())) + 1
        off = np.arange(-R, R + 1)
        dy, dx = np.meshgrid(off, off, indexing="ij")
        dy, dx = dy.ravel()[None, :], dx.ravel()[None, :]
        x0 = np.round(nuclei["x"][idx]).astype(np.int64)[:, None]
        y0 = np.round(nuclei["y"][idx]).astype(np.int64)[:, None]
        px, py = x0 + dx, y0 + dy
        relx = px - nuclei["x"][idx][:, None]
        rely = py - nuclei["y"][idx][:, None]
        c, s = np.cos(nuclei["angle"][idx])[:, None], np.sin(nuclei["angle"][idx])[:, None]
        u = (relx * c + rely * s) / nuclei["a"][idx][:, None]
        v = (-relx * s + rely * c) / nuclei["b"][idx][:, None]
        rad = np.sqrt(u * u + v * v)
        # Coverage falls from 1 to 0 over ~1 px at the ellipse edge.
        cov = np.clip((1.0 - rad) * nuclei["b"][idx][:, None] + 0.5, 0.0, 1.0).astype(np.float32)
        ok = (cov > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        flat = (py * w + px)[ok]
        np.maximum.at(cover, flat, cov[ok])
        np.maximum.at(H, flat, (cov * nuclei["hema"][idx][:, None].astype(np.float32))[ok])
    return H.reshape(h, w), cover.reshape(h, w)


def _membranes(rng: np.random.Generator, fat: np.ndarray, P: float) -> np.ndarray:
    """1 on the borders of Voronoi 'fat cells' (diameter ~0.45 P) inside ``fat``, else 0."""
    from scipy.spatial import cKDTree

    out = np.zeros(fat.shape, dtype=np.float32)
    ys, xs = np.nonzero(fat)
    if len(ys) < 10:
        return out
    # Seeds on a jittered square lattice: cells of similar size, like adipocytes.
    cell = 0.45 * P
    gx, gy = np.meshgrid(np.arange(xs.min(), xs.max() + cell, cell), np.arange(ys.min(), ys.max() + cell, cell))
    seeds = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.3 * cell, 0.3 * cell, (gx.size, 2))
    d, _ = cKDTree(seeds).query(np.column_stack([xs, ys]).astype(float), k=2)
    edge = np.clip(1.0 - (d[:, 1] - d[:, 0]) / 1.5, 0.0, 1.0)
    out[ys, xs] = edge
    return out


def _render(rng: np.random.Generator, H: np.ndarray, E: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Beer-Lambert RGB from stain concentrations, with a per-slide stain perturbation."""
    hv = _H_VEC + rng.normal(0.0, 0.03, 3)
    ev = _E_VEC + rng.normal(0.0, 0.03, 3)
    hv, ev = np.abs(hv) / np.linalg.norm(hv), np.abs(ev) / np.linalg.norm(ev)
    gain = float(np.exp(rng.normal(0.0, 0.06)))
    od = gain * (H[..., None] * hv.astype(np.float32) + E[..., None] * ev.astype(np.float32))
    rgb = _GLASS.astype(np.float32) * np.exp(-od)
    rgb += rng.normal(0.0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _box_sums(maps: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """Sum of each map over the (2*half) square centred at (x, y); maps (m, h, w) -> (n, m)."""
    m, h, w = maps.shape
    ii = np.zeros((m, h + 1, w + 1), dtype=np.float64)
    ii[:, 1:, 1:] = maps.cumsum(axis=1, dtype=np.float64).cumsum(axis=2)
    x0 = np.clip(np.round(x).astype(int) - half, 0, w)
    x1 = np.clip(np.round(x).astype(int) + half, 0, w)
    y0 = np.clip(np.round(y).astype(int) - half, 0, h)
    y1 = np.clip(np.round(y).astype(int) + half, 0, h)
    return (ii[:, y1, x1] - ii[:, y0, x1] - ii[:, y1, x0] + ii[:, y0, x0]).T


def _spot_features(
    nuclei: dict[str, np.ndarray],
    H: np.ndarray,
    E: np.ndarray,
    cover: np.ndarray,
    region: np.ndarray,
    tissue: np.ndarray,
    sx: np.ndarray,
    sy: np.ndarray,
    P: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The morphology features of :data:`FEATURES` over the patch around each spot."""
    h, w = H.shape
    half = int(round(P / 2))
    # Nucleus areas binned at their centres, so a box sum gives the area of nuclei in the patch.
    ix = np.minimum(nuclei["x"].astype(int), w - 1)
    iy = np.minimum(nuclei["y"].astype(int), h - 1)
    n_map = np.zeros((h, w))
    a_map = np.zeros((h, w))
    np.add.at(n_map, (iy, ix), 1.0)
    np.add.at(a_map, (iy, ix), np.pi * nuclei["a"] * nuclei["b"] / (P * P))
    white = (tissue == 0) | ((H + E) < 0.15)
    maps = np.stack(
        [cover, H * cover, E, white.astype(np.float64), n_map, a_map]
        + [(region == r).astype(np.float64) for r in range(len(REGIONS))]
    )
    sums = _box_sums(maps, sx, sy, half)
    area = float((2 * half) ** 2)
    nuc_frac = sums[:, 0] / area
    # A patch without nuclei has no nuclear stain or size: give it the neutral (centre) value.
    hema = np.where(sums[:, 0] > 0.5, sums[:, 1] / np.maximum(sums[:, 0], 1e-9), _FEATURE_CENTER[2])
    nuc_area = np.where(sums[:, 4] > 0, sums[:, 5] / np.maximum(sums[:, 4], 1e-9), _FEATURE_CENTER[1])
    eosin = sums[:, 2] / area
    white_frac = sums[:, 3] / area
    frac = sums[:, 6:] / area
    feats = np.column_stack([nuc_frac, nuc_area, hema, eosin, white_frac, frac])
    return feats, frac


# -- ground truth off the spots ---------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _slide_maps(params_json: str, k: int) -> dict[str, Any]:
    """The maps slide ``k`` was drawn from (redrawn deterministically; the last two kept in memory)."""
    params = json.loads(params_json)
    genes = _gene_model(params)
    keep: dict[str, Any] = {}
    _draw_slide(k, params, genes, keep=keep)
    keep["genes"] = genes
    return keep


def synthetic_truth(slide: Any, xy: Any) -> np.ndarray:
    """Noise-free expected counts of a synthetic slide at any pixel positions.

    The same model as the slide's counts (module notes), evaluated at ``xy``:
    morphology features of the ``patch_px`` square around each position,
    the expression-only spatial fields at the position, and the slide's library
    offset; the per-spot library noise is left out, so at the slide's own
    spots the result is ``obsm["true_mean"]`` divided by a per-spot factor
    common to all genes. The slide is redrawn from its parameters (about a
    second for the default sizes; the last two slides are kept in memory).

    Parameters
    ----------
    slide
        A slide of :func:`synthetic` (it carries ``uns["he2st_synthetic"]``).
    xy
        ``(n, 2)`` pixel positions ``(x, y)`` in the slide's image.

    Returns
    -------
    numpy.ndarray
        ``float64 (n, n_genes)`` expected counts, genes in the slide's order (``GENE000`` ...).

    Raises
    ------
    He2stInputError
        ``slide`` is not a synthetic slide, or ``xy`` is not an ``(n, 2)`` array of finite numbers.
    """
    from he2st.errors import He2stInputError

    info = getattr(slide, "uns", {}).get("he2st_synthetic")
    if not isinstance(info, dict) or "slide_index" not in info:
        raise He2stInputError("synthetic_truth: expected a slide of he2st.datasets.synthetic() (uns['he2st_synthetic'])")
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise He2stInputError(f"synthetic_truth: xy must be a finite (n, 2) array of pixel (x, y), got shape {pts.shape}")
    params = {key: int(info[key]) for key in ("n_spots", "n_genes", "patch_px", "seed", "version")}
    if params["version"] != GENERATOR_VERSION:
        raise He2stInputError(
            f"synthetic_truth: slide drawn by generator version {params['version']}, this is version {GENERATOR_VERSION}"
        )
    maps = _slide_maps(json.dumps(params, sort_keys=True), int(info["slide_index"]))
    h, w = maps["H"].shape
    P = float(params["patch_px"])
    feats, _ = _spot_features(
        maps["nuclei"], maps["H"], maps["E"], maps["cover"], maps["region"], maps["tissue"], pts[:, 0], pts[:, 1], P
    )
    z = (feats - _FEATURE_CENTER) / _FEATURE_SCALE
    gy = np.clip(np.round(pts[:, 1]).astype(int), 0, h - 1)
    gx = np.clip(np.round(pts[:, 0]).astype(int), 0, w - 1)
    fields = maps["fields"][:, gy, gx].T
    genes = maps["genes"]
    log_mu = genes["base"][None, :] + z @ genes["W"].T + fields @ genes["V"].T + maps["lib_slide"]
    return np.exp(np.clip(log_mu, -10.0, 9.0))


__all__ = ["FEATURES", "GENERATOR_VERSION", "REGIONS", "synthetic", "synthetic_truth"]
