"""The synthetic slide generator: determinism, seams, calibration, staining."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from adapter.synth import SynthOutput, expected_scores
from pipeline.labels import Compartment
from pipeline.stains import StainMatrix
from pipeline.synth import STROMA, TUMOUR, SlideModel, SynthSpec, render_tile
from pipeline.synth.model import value_noise


def test_same_seed_same_pixels_other_seed_differs() -> None:
    spec = SynthSpec(width=512, height=512, seed=5)
    a = render_tile(SlideModel(spec), 0, 0, 256, 256).pixels
    b = render_tile(SlideModel(spec), 0, 0, 256, 256).pixels
    c = render_tile(SlideModel(spec.model_copy(update={"seed": 6})), 0, 0, 256, 256).pixels
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tiles_are_seamless() -> None:
    """Two half tiles side by side equal one whole tile (noise off)."""
    model = SlideModel(SynthSpec(width=1024, height=1024, seed=2, noise_sigma=0))
    whole = render_tile(model, 300, 300, 256, 128)
    left = render_tile(model, 300, 300, 128, 128)
    right = render_tile(model, 428, 300, 128, 128)
    joined = np.concatenate([left.pixels, right.pixels], axis=1)
    assert np.abs(joined.astype(int) - whole.pixels).max() <= 1
    assert len(left.cells["x_um"]) + len(right.cells["x_um"]) == len(whole.cells["x_um"])


def test_value_noise_is_continuous_and_bounded() -> None:
    u = np.linspace(-3, 3, 601)
    v = np.zeros_like(u)
    n = value_noise(u, v, seed=1)
    assert n.min() >= 0 and n.max() <= 1
    assert np.abs(np.diff(n)).max() < 0.05


@pytest.mark.parametrize("fraction", [0.05, 0.4, 0.7])
def test_tumour_fraction_is_calibrated(fraction: float) -> None:
    spec = SynthSpec(width=4096, height=4096, seed=1, tumour_fraction=fraction)
    labels = SlideModel(spec).truth_labels()
    counts = np.bincount(labels.ravel(), minlength=len(Compartment))
    measured = counts[TUMOUR] / (counts[TUMOUR] + counts[STROMA])
    assert measured == pytest.approx(fraction, abs=0.01)
    fat = counts[Compartment.FAT]
    assert fat / (counts[STROMA] + fat) == pytest.approx(spec.fat_fraction, abs=0.01)


def test_painted_dab_follows_intensity_class() -> None:
    """Deconvolving pixels at nuclear centroids recovers the class order."""
    spec = SynthSpec(width=1024, height=1024, seed=4, tumour_fraction=0.8, noise_sigma=0)
    tile = render_tile(SlideModel(spec), 256, 256, 512, 512)
    inv = np.linalg.inv(StainMatrix().matrix())
    od = -np.log10(np.maximum(tile.pixels.astype(float), 1) / spec.background)
    dab = (od @ inv)[..., 1]
    col = (tile.cells["x_um"] / spec.mpp).astype(int) - 256
    row = (tile.cells["y_um"] / spec.mpp).astype(int) - 256
    cls = tile.cells["intensity_class"]
    means = [dab[row[cls == k], col[cls == k]].mean() for k in range(4)]
    assert all(np.diff(means) > 0.1), means
    assert means[0] < 0.15 and means[3] > 0.55


def test_membranous_stain_is_on_the_membrane() -> None:
    spec = SynthSpec(width=1024, height=1024, seed=4, tumour_fraction=0.8, localisation="membranous", noise_sigma=0)
    tile = render_tile(SlideModel(spec), 256, 256, 512, 512)
    inv = np.linalg.inv(StainMatrix().matrix())
    dab = (-np.log10(np.maximum(tile.pixels.astype(float), 1) / spec.background) @ inv)[..., 1]
    strong = tile.cells["intensity_class"] == 3
    col = (tile.cells["x_um"][strong] / spec.mpp).astype(int) - 256
    row = (tile.cells["y_um"][strong] / spec.mpp).astype(int) - 256
    ok = (col > 20) & (col < 490) & (row > 20) & (row < 490)
    centre = dab[row[ok], col[ok]].mean()
    # A ring 6-7.5 µm (12-15 px) from the centre crosses the membrane.
    ring = np.mean([dab[row[ok] + dy, col[ok] + dx].max() for dy, dx in ((0, 14), (0, -14), (14, 0), (-14, 0))])
    assert centre < 0.1 < 0.4 < ring


def test_expected_scores_by_hand() -> None:
    spec = SynthSpec(width=64, height=64)
    cells = {
        "compartment": np.array([TUMOUR] * 4 + [STROMA] * 2, np.uint8),
        "intensity_class": np.array([0, 1, 2, 3, 0, 3], np.uint8),
    }
    labels = np.array([[1, 1, 2, 0], [2, 2, 3, 0]], np.uint8)
    got = expected_scores(cells, labels, spec, step_px=4)
    tumour = got["compartments"]["tumour"]
    assert tumour["h_score"] == pytest.approx(100 * (1 * 1 + 2 * 1 + 3 * 1) / 4)  # one cell of each class
    assert tumour["positive_percent"] == pytest.approx(75.0)
    assert got["compartments"]["stroma"]["h_score"] == pytest.approx(150.0)
    assert got["compartments"]["tissue"]["cells"] == 6
    assert got["tumour_fraction"] == pytest.approx(2 / 5)
    assert tumour["area_mm2"] == pytest.approx(2 * (4 * 0.5 / 1000) ** 2)


def test_spec_validation_names_the_parameter() -> None:
    with pytest.raises(ValidationError, match="tumour_classes"):
        SynthSpec(tumour_classes=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValidationError, match="tile_size"):
        SynthSpec(tile_size=100)
    with pytest.raises(ValidationError, match="extra"):
        SynthSpec(colour="red")  # type: ignore[call-arg]


def test_generated_truth_is_consistent(small_slide: SynthOutput) -> None:
    truth = small_slide.truth
    cells = np.load(small_slide.truth_dir / "cells.npz")
    tumour = cells["compartment"] == TUMOUR
    assert truth["compartments"]["tumour"]["cells"] == int(tumour.sum()) > 100
    assert truth["compartments"]["tissue"]["cells"] == len(cells["x_px"])
    assert (cells["x_px"] >= 0).all() and (cells["x_px"] < 1000).all()
    assert (cells["y_px"] >= 0).all() and (cells["y_px"] < 760).all()
    assert 0.2 < truth["tumour_fraction"] < 0.6
    assert (small_slide.truth_dir / "compartments.png").exists()


def _nuclear_od(spec: SynthSpec) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Cells of a tumour-rich tile and the haematoxylin / DAB OD of its pixels."""
    from pipeline.stains import deconvolve

    model = SlideModel(spec)
    tile = render_tile(model, 0, 0, 512, 512)
    return tile.cells, deconvolve(tile.pixels, StainMatrix(*map(tuple, model.stain_matrix)), spec.background)


def test_hard_cases_of_real_slides() -> None:
    base = {"width": 512, "height": 512, "seed": 9, "tumour_fraction": 0.8, "noise_sigma": 0.0}
    plain_cells, plain = _nuclear_od(SynthSpec(**base))
    # A pale counterstain: every nucleus' haematoxylin scaled down, the same cells.
    pale_cells, pale = _nuclear_od(SynthSpec(**base, counterstain_scale=0.35))
    assert np.allclose(pale_cells["h_od"], 0.35 * plain_cells["h_od"])
    assert np.percentile(pale[..., 0], 99) < 0.5 * np.percentile(plain[..., 0], 99)
    # Brown nuclei with little haematoxylin left: the more DAB, the less blue.
    masked, _ = _nuclear_od(SynthSpec(**base, dab_masks_hematoxylin=0.85))
    strong = masked["dab_od"] >= 0.8
    assert strong.any()
    assert np.allclose(masked["h_od"][strong], 0.15 * plain_cells["h_od"][strong])
    # Saturated DAB: the darkest channel of the strongest nuclei sits at the floor of the 8-bit range.
    dark = render_tile(SlideModel(SynthSpec(**base, strong_dab_od=2.2, tumour_classes=(0, 0, 0, 1))), 0, 0, 256, 256)
    assert (dark.pixels[..., 2] <= 5).sum() > 100
    # DAB drawn without gaps: cells lie right at the class cut-offs, and their classes follow the cut-offs.
    many = SlideModel(SynthSpec(width=4096, height=4096, seed=3, continuous_dab=True)).cells_in(0, 0, 1024, 1024)
    near = np.abs(many["dab_od"][:, None] - np.array([0.2, 0.4, 0.6])[None]).min(axis=1)
    assert (near < 0.01).sum() > 20
    assert np.array_equal(many["intensity_class"], np.digitize(many["dab_od"], [0.2, 0.4, 0.6]))
    gapped = SlideModel(SynthSpec(width=4096, height=4096, seed=3)).cells_in(0, 0, 1024, 1024)
    assert (np.abs(gapped["dab_od"][:, None] - np.array([0.2, 0.4, 0.6])[None]).min(axis=1) < 0.04).sum() == 0
    # A scanner colour cast: glass is no longer neutral.
    cast = render_tile(SlideModel(SynthSpec(**base, colour_cast=(1.0, 0.94, 0.86))), 0, 0, 64, 64).pixels
    assert cast[0, 0, 0] - cast[0, 0, 2] > 25


def test_a_fold_lays_the_tissue_twice_where_its_truth_says() -> None:
    """Inside a fold the stains' optical density is twice that of the same tissue without it;
    outside, the pixels are those of the fold-free twin."""
    spec = SynthSpec(width=2048, height=2048, seed=73, noise_sigma=0, folds=1)
    folded, flat = SlideModel(spec), SlideModel(spec.model_copy(update={"folds": 0}))
    (x0, y0, x1, y1, half) = folded.fold[0]
    assert 40.0 <= half <= 90.0
    cx, cy = int((x0 + x1) / 2 / spec.mpp), int((y0 + y1) / 2 / spec.mpp)
    a = render_tile(folded, cx - 256, cy - 256, 512, 512).pixels.astype(float)
    b = render_tile(flat, cx - 256, cy - 256, 512, 512).pixels.astype(float)
    xs = (cx - 256 + np.arange(512) + 0.5) * spec.mpp
    xx, yy = np.meshgrid(xs, (cy - 256 + np.arange(512) + 0.5) * spec.mpp)
    inside = folded.fold_at(xx, yy) == 1.0
    outside = ~ndimage.binary_dilation(folded.fold_at(xx, yy) > 0, iterations=4)  # past the optics' blur
    assert inside.sum() > 1000 and outside.sum() > 1000
    od_a, od_b = (-np.log10(np.maximum(p, 1) / spec.background).sum(-1) for p in (a, b))
    tissue = inside & (od_b > 0.1) & (od_a < 2.0)  # stained, and not clipped at black
    assert np.median(od_a[tissue] / od_b[tissue]) == pytest.approx(2.0, abs=0.1)
    assert np.abs(a[outside] - b[outside]).max() <= 1
    truth = folded.truth_fold()
    s = folded.truth_step_px
    assert truth[int(cy / s), int(cx / s)] and truth.mean() < 0.2


def test_a_bubble_has_a_grey_rim_and_paler_tissue_inside() -> None:
    """An air bubble: on its rim every channel loses the same optical density (grey, ~0.9); inside,
    the tissue's density is 0.8 of the bubble-free twin's (softened); outside, the twin's pixels."""
    spec = SynthSpec(width=2048, height=2048, seed=74, noise_sigma=0, bubbles=1, tumour_fraction=0.8)
    bubbled, flat = SlideModel(spec), SlideModel(spec.model_copy(update={"bubbles": 0}))
    cx, cy, r = bubbled.bubble[0]
    assert 60.0 <= r <= 200.0
    half = int((r + 30) / spec.mpp)
    x0, y0 = int(cx / spec.mpp) - half, int(cy / spec.mpp) - half
    a = render_tile(bubbled, x0, y0, 2 * half, 2 * half).pixels.astype(float)
    b = render_tile(flat, x0, y0, 2 * half, 2 * half).pixels.astype(float)
    xs = (x0 + np.arange(2 * half) + 0.5) * spec.mpp
    xx, yy = np.meshgrid(xs, (y0 + np.arange(2 * half) + 0.5) * spec.mpp)
    d = np.hypot(xx - cx, yy - cy)
    od_a, od_b = (-np.log10(np.maximum(p, 1) / spec.background) for p in (a, b))
    on_rim = np.abs(d - r) < 0.5
    extra = od_a[on_rim] - od_b[on_rim]
    assert np.median(extra) > 0.7 and np.median(extra.max(-1) - extra.min(-1)) < 0.1  # dark and grey
    inner = d < r - 8  # softening moves density about, not in total
    assert od_a.sum(-1)[inner].sum() / od_b.sum(-1)[inner].sum() == pytest.approx(0.8, abs=0.05)
    outer = d > r + 8
    assert np.abs(a[outer] - b[outer]).max() <= 1
    truth = bubbled.truth_bubble()
    s = bubbled.truth_step_px
    assert truth[int(cy / spec.mpp / s), int(cx / spec.mpp / s)] and truth.mean() < 0.2


def test_debris_is_grey_and_leaves_the_rest_untouched() -> None:
    """Debris (dust, dirt): inside a particle every channel gains the particle's optical density
    (grey, 0.6–0.9); away from it the pixels are the debris-free twin's; the truth marks it."""
    spec = SynthSpec(width=2048, height=2048, seed=82, noise_sigma=0, debris=3)
    dusty, flat = SlideModel(spec), SlideModel(spec.model_copy(update={"debris": 0}))
    assert len(dusty.debris) == 3
    truth, s = dusty.truth_debris(), dusty.truth_step_px
    for cx, cy, r, od, *_ in dusty.debris:
        assert 15.0 <= r <= 50.0 and 0.6 <= od <= 0.9
        half = int((1.4 * r + 10) / spec.mpp)
        x0, y0 = int(cx / spec.mpp) - half, int(cy / spec.mpp) - half
        a = render_tile(dusty, x0, y0, 2 * half, 2 * half).pixels.astype(float)
        b = render_tile(flat, x0, y0, 2 * half, 2 * half).pixels.astype(float)
        xx, yy = np.meshgrid(*((o + np.arange(2 * half) + 0.5) * spec.mpp for o in (x0, y0)))
        grey = dusty.debris_at(xx, yy)
        od_a, od_b = (-np.log10(np.maximum(p, 1) / spec.background) for p in (a, b))
        inside = (grey >= od - 1e-6) & (a.min(-1) > 4)  # (not clipped at black)
        extra = od_a[inside] - od_b[inside]
        assert np.median(extra) == pytest.approx(od, abs=0.05)
        assert np.median(extra.max(-1) - extra.min(-1)) < 0.05  # grey
        d = np.hypot(xx - cx, yy - cy)
        away = (d > 1.35 * r + 2) & (dusty.debris_at(xx, yy) == 0)
        assert np.abs(a[away] - b[away]).max() <= 1
        assert truth[int(cy / spec.mpp / s), int(cx / spec.mpp / s)]
    assert truth.mean() < 0.05
