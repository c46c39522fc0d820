"""Image-quality metrics on the paper's scale, to show the perturbation is small where it matters (numpy only).

The paper reports PSNR and SSIM on images mapped to [0, 1] from a +-5 sigma window. Both metrics are invariant to a
common affine rescaling of the two images once the peak / data range is rescaled with them, so callers pass that
window width in raw units (10 standard deviations of the case's channel) and no intensity mapping is needed here.
"""
import numpy as np
from skimage.metrics import structural_similarity

SSIM_SIGMA, SSIM_K1, SSIM_K2 = 1.5, 0.01, 0.03  # Wang et al. 2004


def psnr(clean: np.ndarray, protected: np.ndarray, window: float, mask: np.ndarray | None = None) -> float:
    """10 log10(window^2 / MSE), MSE over `mask` (e.g. the nonzero region) or over all voxels; inf if identical."""
    if not window > 0:
        raise ValueError(f"window must be a positive intensity range; got {window}")
    clean, protected = _same_shape(clean, protected)
    squared = _masked(np.square(protected - clean), mask)
    mse = float(squared.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(window ** 2 / mse))


def ssim3d(clean: np.ndarray, protected: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    """SSIM with a 3D Gaussian window (sigma 1.5, K1 0.01, K2 0.03) averaged over `mask` or over all voxels.

    The SSIM map covers every voxel (skimage filters with reflected borders), so the mask, not a border crop, decides
    which voxels count. Volumes need at least 11 voxels per side (the Gaussian window's extent).
    """
    clean, protected = _same_shape(clean, protected)
    if clean.ndim != 3:
        raise ValueError(f"ssim3d takes one 3D volume (call it per channel); got shape {clean.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range must be a positive intensity range; got {data_range}")
    _, ssim_map = structural_similarity(
        clean, protected, data_range=data_range, channel_axis=None,
        gaussian_weights=True, sigma=SSIM_SIGMA, K1=SSIM_K1, K2=SSIM_K2,
        use_sample_covariance=False, full=True)
    return float(_masked(ssim_map, mask).mean())


def _same_shape(clean, protected) -> tuple[np.ndarray, np.ndarray]:
    clean, protected = np.asarray(clean, dtype=np.float64), np.asarray(protected, dtype=np.float64)
    if clean.shape != protected.shape:
        raise ValueError(f"clean {clean.shape} and protected {protected.shape} must have the same shape")
    return clean, protected


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return values
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {values.shape}")
    if not mask.any():
        raise ValueError("mask selects no voxels")
    return values[mask]
