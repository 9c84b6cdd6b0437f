"""Paint tiles of a synthetic slide from its :class:`SlideModel` (Beer–Lambert).

Per pixel: the nearest cell seed (Euclidean distance transform, i.e. a
Voronoi partition) decides which cell a pixel may belong to; the cell's
ellipse decides nucleus, its expanded ellipse the cell territory, and
Voronoi borders plus the territory rim the membrane. Haematoxylin and DAB
concentrations are painted per compartment, blurred by a small optical PSF,
turned into RGB with the slide's stain vectors and given sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.synth.model import FAT, STROMA, TUMOUR, SlideModel, value_noise

#: Margin (µm) rendered around a tile so cells across the seam are complete.
MARGIN_UM = 14.0
#: Membrane thickness in µm.
MEMBRANE_UM = 1.0


@dataclass(frozen=True)
class RenderedTile:
    """Pixels of a tile core and the cells whose centres lie in it."""

    x: int
    y: int
    pixels: np.ndarray
    cells: dict[str, np.ndarray]


#: Optical density of green marker ink (absorbs red and blue light).
INK_OD = np.array([0.9, 0.25, 0.75])

#: How much more light an over-exposed disc lets through.
OVEREXPOSURE_GAIN = 1.3

#: Optical density of a bubble's rim: grey, light refracted away in every colour.
BUBBLE_RIM_OD = np.array([0.9, 0.9, 0.9])


def render_tile(model: SlideModel, x: int, y: int, width: int, height: int) -> RenderedTile:
    """Render level-0 pixels ``[x, x+width) × [y, y+height)``."""
    spec = model.spec
    mpp = spec.mpp
    m = math.ceil(MARGIN_UM / mpp)
    X0, Y0, W, H = x - m, y - m, width + 2 * m, height + 2 * m
    xs = (X0 + np.arange(W) + 0.5) * mpp
    ys = (Y0 + np.arange(H) + 0.5) * mpp
    xx, yy = np.meshgrid(xs, ys)
    labels = model.labels_at(xx, yy)
    rng = np.random.default_rng([spec.seed, 3, x, y])
    core = (slice(m, m + height), slice(m, m + width))

    cells = model.cells_in(X0 * mpp, Y0 * mpp, (X0 + W) * mpp, (Y0 + H) * mpp)
    in_core = (
        (cells["x_um"] >= x * mpp)
        & (cells["x_um"] < (x + width) * mpp)
        & (cells["y_um"] >= y * mpp)
        & (cells["y_um"] < (y + height) * mpp)
    )
    core_cells = {k: v[in_core] for k, v in cells.items()}

    conc_h = np.zeros((H, W), np.float64)
    conc_d = np.zeros((H, W), np.float64)
    tissue = labels != 0
    if tissue.any():
        _paint_matrix(model, labels, xx, yy, conc_h, conc_d)
    if cells["x_um"].size:
        _paint_cells(model, cells, xx, yy, X0, Y0, conc_h, conc_d)

    if spec.folds:
        # A fold: the section turned over onto itself, so light crosses it twice.
        layers = 1.0 + model.fold_at(xx, yy)
        conc_h *= layers
        conc_d *= layers
    sigma_px = 0.35 / mpp
    if sigma_px > 0.2:
        conc_h = ndimage.gaussian_filter(conc_h, sigma_px)
        conc_d = ndimage.gaussian_filter(conc_d, sigma_px)
    if spec.blur_patches:
        defocus = model.blur_at(xx, yy)
        if defocus.any():
            sigma = spec.blur_sigma_um / mpp  # the tile's margin (14 µm) holds the blur's reach
            conc_h = np.where(defocus, ndimage.gaussian_filter(conc_h, sigma), conc_h)
            conc_d = np.where(defocus, ndimage.gaussian_filter(conc_d, sigma), conc_d)
    rim = None
    if spec.bubbles:
        inside, rim = model.bubble_at(xx, yy)
        if inside.any():
            # Under a bubble the tissue is out of the focal plane and seen through air: paler, soft.
            sigma = 1.5 / mpp
            conc_h = np.where(inside, 0.8 * ndimage.gaussian_filter(conc_h, sigma), conc_h)
            conc_d = np.where(inside, 0.8 * ndimage.gaussian_filter(conc_d, sigma), conc_d)
    conc = np.stack([conc_h[core], conc_d[core]], axis=-1)
    od = conc @ model.stain_matrix
    if rim is not None and rim.any():
        od = od + rim[core][..., None] * BUBBLE_RIM_OD  # the rim absorbs all colours alike
    if spec.debris:
        grey = model.debris_at(xx[core], yy[core])
        od = od + grey[..., None]  # dust and dirt absorb every colour alike
    if spec.pen_strokes:
        ink = model.ink_at(xx[core], yy[core])
        od = od + ink[..., None] * INK_OD  # marker ink over the tissue, by Beer–Lambert like the stains
    rgb = spec.background * np.asarray(spec.colour_cast) * np.power(10.0, -od)
    if spec.overexposed:
        # Too much light: every channel 1.3 times brighter, clipped at white below.
        rgb = rgb * np.where(model.overexposed_at(xx[core], yy[core]), OVEREXPOSURE_GAIN, 1.0)[..., None]
    if spec.noise_sigma > 0:
        rgb += rng.normal(0.0, spec.noise_sigma, rgb.shape)
    pixels = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return RenderedTile(x=x, y=y, pixels=pixels, cells=core_cells)


def _paint_matrix(
    model: SlideModel, labels: np.ndarray, xx: np.ndarray, yy: np.ndarray, conc_h: np.ndarray, conc_d: np.ndarray
) -> None:
    """Extracellular matrix: fibrous stroma, faint tumour background, empty fat."""
    seed = model.spec.seed
    pale = model.spec.counterstain_scale
    stroma = labels == STROMA
    if stroma.any():
        fibre = _fibres(model.stroma_angle(xx[stroma], yy[stroma]), xx[stroma], yy[stroma], seed)
        conc_h[stroma] = (0.04 + 0.08 * fibre**2) * pale
        conc_d[stroma] = 0.01
    tumour = labels == TUMOUR
    conc_h[tumour] = 0.06 * pale
    conc_d[tumour] = 0.01
    conc_h[labels == FAT] = 0.005 * pale


#: Fibre orientations blended by the local flow angle (radians).
_FIBRE_ANGLES = (0.0, np.pi / 3, 2 * np.pi / 3)


def _fibres(angle: np.ndarray, x_um: np.ndarray, y_um: np.ndarray, seed: int) -> np.ndarray:
    """Collagen-like streaks along the local flow angle, seamless across tiles.

    Rotating absolute coordinates by a spatially varying angle would shear
    them without bound far from the origin, so instead a few fixed-orientation
    anisotropic noises are blended with weights that follow the local angle.
    """
    total = np.zeros_like(x_um)
    weights = np.zeros_like(x_um)
    for k, theta in enumerate(_FIBRE_ANGLES):
        w = np.cos(angle - theta) ** 8
        u = (x_um * np.cos(theta) + y_um * np.sin(theta)) / 10.0
        v = (-x_um * np.sin(theta) + y_um * np.cos(theta)) / 1.2
        total += w * value_noise(u, v, seed * 31 + 5 + k)
        weights += w
    return total / np.maximum(weights, 1e-6)


def _paint_cells(
    model: SlideModel,
    cells: dict[str, np.ndarray],
    xx: np.ndarray,
    yy: np.ndarray,
    X0: int,
    Y0: int,
    conc_h: np.ndarray,
    conc_d: np.ndarray,
) -> None:
    spec = model.spec
    mpp = spec.mpp
    H, W = xx.shape
    px = np.floor(cells["x_um"] / mpp).astype(np.int64) - X0
    py = np.floor(cells["y_um"] / mpp).astype(np.int64) - Y0
    ok = (px >= 0) & (px < W) & (py >= 0) & (py < H)
    seeds = np.zeros((H, W), np.int32)
    seeds[py[ok], px[ok]] = np.nonzero(ok)[0] + 1
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix] - 1  # index of the nearest cell for every pixel

    cos_t, sin_t = np.cos(cells["theta"])[owner], np.sin(cells["theta"])[owner]
    dx = xx - cells["x_um"][owner]
    dy = yy - cells["y_um"][owner]
    u = dx * cos_t + dy * sin_t
    v = -dx * sin_t + dy * cos_t
    a, b = cells["a_um"][owner], cells["b_um"][owner]
    e = cells["expand_um"][owner]
    nucleus = (u / a) ** 2 + (v / b) ** 2 < 1.0
    r_cell = np.sqrt((u / (a + e)) ** 2 + (v / (b + e)) ** 2)
    territory = r_cell < 1.0
    border = np.zeros_like(territory)
    dh = owner[:, 1:] != owner[:, :-1]
    border[:, 1:] |= dh
    border[:, :-1] |= dh
    dv = owner[1:, :] != owner[:-1, :]
    border[1:, :] |= dv
    border[:-1, :] |= dv
    rim = r_cell > 1.0 - MEMBRANE_UM / (b + e)
    membrane = territory & ~nucleus & (border | rim)
    cytoplasm = territory & ~nucleus & ~membrane

    seed = spec.seed
    chrom = value_noise(xx / 1.2, yy / 1.2, seed * 31 + 7)
    speckle = value_noise(xx / 0.8, yy / 0.8, seed * 31 + 11)
    tumour_cell = cells["compartment"][owner] == TUMOUR
    pale = spec.counterstain_scale
    conc_h[cytoplasm] = np.where(tumour_cell[cytoplasm], 0.10, 0.07) * pale
    conc_h[membrane] = 0.12 * pale
    conc_h[nucleus] = cells["h_od"][owner][nucleus] * (0.7 + 0.6 * chrom[nucleus])

    dab = cells["dab_od"][owner] * (0.85 + 0.3 * speckle)
    where = spec.localisation
    if where == "nuclear":
        conc_d[nucleus] = dab[nucleus]
    elif where == "cytoplasmic":
        stained = cytoplasm | membrane
        conc_d[stained] = dab[stained]
    else:
        conc_d[membrane] = dab[membrane]
        conc_d[cytoplasm] = 0.1 * dab[cytoplasm]
