from __future__ import annotations

import numpy as np
import pytest

from pipeline.stains import (
    StainMatrix,
    angle_deg,
    deconvolve,
    estimate_dominant,
    estimate_macenko,
    rgb_to_od,
    stain_planes,
)


def test_deconvolution_recovers_painted_concentrations() -> None:
    stains = StainMatrix()
    rng = np.random.default_rng(0)
    conc = np.zeros((64, 64, 3))
    conc[..., 0] = rng.uniform(0, 0.8, (64, 64))
    conc[..., 1] = rng.uniform(0, 0.8, (64, 64))
    rgb = np.clip(np.rint(stains.concentrations_to_rgb(conc)), 0, 255).astype(np.uint8)
    out = deconvolve(rgb, stains)
    # 8-bit quantisation limits the precision at high OD.
    assert np.abs(out[..., 0] - conc[..., 0]).mean() < 0.01
    assert np.abs(out[..., 1] - conc[..., 1]).mean() < 0.01


@pytest.mark.parametrize("background", [255.0, (240.0, 230.0, 250.0)])
def test_stain_planes_are_the_deconvolution_h_and_dab(background: float | tuple[float, float, float]) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    stains = StainMatrix(hematoxylin=(0.55, 0.75, 0.37), dab=(0.3, 0.52, 0.8))
    full = deconvolve(rgb, stains, background)
    h, dab = stain_planes(rgb, stains, background)
    assert h.dtype == dab.dtype == np.float32 and h.shape == dab.shape == (37, 53)
    assert np.abs(h - full[..., 0]).max() < 1e-5
    assert np.abs(dab - full[..., 1]).max() < 1e-5


def test_od_of_white_is_zero_and_background_is_per_channel() -> None:
    px = np.array([[[255, 255, 255], [240, 230, 250]]], np.uint8)
    assert np.allclose(rgb_to_od(px)[0, 0], 0)
    od = rgb_to_od(px, (240.0, 230.0, 250.0))
    assert np.allclose(od[0, 1], 0)
    assert rgb_to_od(np.zeros((1, 1, 3), np.uint8))[0, 0, 0] == pytest.approx(np.log10(255))


def test_macenko_recovers_rotated_vectors_and_falls_back() -> None:
    ref = StainMatrix()
    true = StainMatrix(hematoxylin=(0.55, 0.75, 0.37), dab=(0.3, 0.52, 0.8))
    rng = np.random.default_rng(1)
    conc = np.zeros((20000, 3))
    conc[:10000, 0] = rng.uniform(0.1, 0.7, 10000)
    conc[10000:, 1] = rng.uniform(0.1, 0.7, 10000)
    conc[:, :2] += rng.uniform(0, 0.05, (20000, 2))
    od = conc @ true.matrix()
    est, status = estimate_macenko(od, ref)
    assert status == "estimated"
    assert angle_deg(est.hematoxylin, true.hematoxylin) < 3
    assert angle_deg(est.dab, true.dab) < 3
    same, why = estimate_macenko(od[:10], ref)
    assert same is ref and "stained pixels" in why
    green = np.tile([[0.0, 0.5, 0.0], [0.5, 0.0, 0.0]], (1000, 1)) + rng.uniform(0, 0.05, (2000, 3))
    same, why = estimate_macenko(green, ref, max_angle_deg=10)
    assert same is ref and "kept default" in why


def _mixed_od(true: StainMatrix, seed: int = 1) -> np.ndarray:
    """Blue nuclei, brown nuclei with some haematoxylin, pale mixtures and a little residual noise."""
    rng = np.random.default_rng(seed)
    n = 30000
    conc = np.zeros((n, 3))
    conc[: n // 3, 0] = rng.uniform(0.1, 0.8, n // 3)  # blue
    conc[n // 3 : 2 * n // 3, 1] = rng.uniform(0.2, 1.0, n // 3)  # brown ...
    conc[n // 3 : 2 * n // 3, 0] = rng.uniform(0.0, 0.3, n // 3)  # ... with some haematoxylin under it
    conc[2 * n // 3 :, :2] = rng.uniform(0.0, 0.2, (n - 2 * n // 3, 2))  # pale mixtures
    conc[:, 2] = rng.normal(0, 0.02, n)
    return conc @ true.matrix()


def test_dominant_pixel_estimate_stays_on_right_vectors_and_recovers_rotated_ones() -> None:
    """Where the stains are the defaults the estimate stays on them; rotated stains are recovered;
    too little stain and far-off vectors fall back to the reference, with the reason."""
    ref = StainMatrix()
    est, status = estimate_dominant(_mixed_od(ref), ref)
    assert status == "estimated"
    assert angle_deg(est.hematoxylin, ref.hematoxylin) < 1.0 and angle_deg(est.dab, ref.dab) < 1.0
    true = StainMatrix(hematoxylin=(0.55, 0.75, 0.37), dab=(0.3, 0.52, 0.8))
    est, status = estimate_dominant(_mixed_od(true), ref)
    assert status == "estimated"
    assert angle_deg(est.hematoxylin, true.hematoxylin) < 2 and angle_deg(est.dab, true.dab) < 3
    same, why = estimate_dominant(_mixed_od(ref)[:100], ref)
    assert same is ref and "stained pixels" in why
    far = StainMatrix(hematoxylin=(0.2, 0.3, 0.93), dab=(0.9, 0.4, 0.1))
    same, why = estimate_dominant(_mixed_od(far), ref, max_angle_deg=10)
    assert same is ref and "kept default" in why
