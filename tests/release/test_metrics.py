"""PSNR and 3D SSIM on the paper's scale, checked against values computed by hand."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from nnunet_voxshield.release.metrics import psnr, ssim3d


def _volume(seed=0, shape=(16, 18, 20)):
    return np.random.default_rng(seed).normal(100.0, 20.0, shape)


def test_psnr_of_known_noise_power():
    clean = _volume()
    protected = clean + 0.1 * np.where(np.random.default_rng(1).random(clean.shape) < 0.5, -1, 1)
    assert psnr(clean, protected, window=1.0) == pytest.approx(20.0)  # MSE 0.01, peak 1
    assert psnr(clean, clean + 2.0, window=200.0) == pytest.approx(20 * np.log10(100.0))


def test_psnr_counts_only_the_mask():
    clean = np.zeros((12, 12, 12))
    protected = clean.copy()
    mask = np.zeros(clean.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    protected[mask] = 0.5
    protected[~mask] = 50.0  # huge differences outside are ignored
    assert psnr(clean, protected, window=5.0, mask=mask) == pytest.approx(20.0)
    assert psnr(clean, protected, window=5.0) < 0


def test_psnr_identical_is_inf_and_scale_free():
    clean, protected = _volume(0), _volume(0) + _volume(1) * 0.01
    assert psnr(clean, clean, window=10.0) == float("inf")
    assert psnr(3 * clean, 3 * protected, 30.0) == pytest.approx(psnr(clean, protected, 10.0))


def test_ssim_identical_is_one_and_falls_with_noise():
    clean = _volume(shape=(24, 24, 24))
    noise = _volume(7, shape=clean.shape) - 100.0
    assert ssim3d(clean, clean, data_range=200.0) == pytest.approx(1.0)
    values = [ssim3d(clean, clean + level * noise, data_range=200.0) for level in (0.05, 0.2, 0.5, 1.0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] < 1.0


def test_ssim_of_two_constant_volumes_matches_formula():
    """Constant a vs constant b: variances vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2."""
    a, b, data_range = 0.5, 0.6, 1.0
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim3d(np.full((12, 12, 12), a), np.full((12, 12, 12), b), data_range=data_range)
    assert got == pytest.approx(expected, rel=1e-9)


def test_ssim_mask_interior_equals_standard_border_cropped_ssim():
    """skimage's standard mean drops a 5-voxel border (half the 11-tap Gaussian window); the same mask agrees."""
    clean = _volume(2, shape=(20, 22, 24))
    protected = clean + 5.0 * (_volume(3, shape=clean.shape) - 100.0) / 20.0
    interior = np.zeros(clean.shape, bool)
    interior[5:-5, 5:-5, 5:-5] = True
    standard = structural_similarity(clean, protected, data_range=200.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim3d(clean, protected, data_range=200.0, mask=interior) == pytest.approx(standard, rel=1e-9)


def test_ssim_is_scale_free_with_its_data_range():
    clean, protected = _volume(4), _volume(4) + _volume(5) * 0.05
    assert ssim3d(4 * clean, 4 * protected, 800.0) == pytest.approx(ssim3d(clean, protected, 200.0))


@pytest.mark.parametrize("call", [
    lambda: psnr(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 1.0),
    lambda: psnr(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 0.0),
    lambda: psnr(np.zeros((4, 4, 4)), np.ones((4, 4, 4)), 1.0, mask=np.zeros((4, 4, 4), bool)),
    lambda: ssim3d(np.zeros((1, 12, 12, 12)), np.zeros((1, 12, 12, 12)), 1.0),
    lambda: ssim3d(np.zeros((12, 12, 12)), np.zeros((12, 12, 12)), -1.0),
])
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()
