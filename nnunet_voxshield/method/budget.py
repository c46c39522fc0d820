"""The L-inf budget: the paper's unit, nnU-Net's normalised units and raw intensities, and the region delta may touch.

The paper states eps on images mapped to [0, 1] from a +-5 sigma window, so eps (paper unit) times the window width in
normalised units gives the budget in nnU-Net's normalised space; times d(raw)/d(normalised) it gives raw intensities:

    eps_norm[c] = eps * window[c]          eps_raw[c] = eps_norm[c] * raw_per_norm[c]

(`window` and `raw_per_norm` come from the preprocessing bridge, per case and channel, for each nnU-Net scheme).
With --eps-raw the raw budget is given and eps_norm = eps_raw / raw_per_norm.
"""
import numpy as np
import torch
from scipy.ndimage import binary_dilation

from nnunet_voxshield.config import DEFAULT_EPS, MAX_EPS
from nnunet_voxshield.errors import VoxShieldError



def validate_eps(eps: float | None, eps_raw: float | None) -> None:
    if eps is not None and eps_raw is not None:
        raise VoxShieldError("give either --eps or --eps-raw, not both")
    if eps is not None and not 0 < eps <= MAX_EPS:
        raise VoxShieldError(f"--eps must be in (0, {MAX_EPS:.4f}] (paper unit, e.g. 4/255 = 0.0157); got {eps}")
    if eps_raw is not None and not eps_raw > 0:
        raise VoxShieldError(f"--eps-raw must be a positive raw-intensity budget; got {eps_raw}")


def eps_norm(window: np.ndarray, raw_per_norm: np.ndarray, eps: float | None, eps_raw: float | None) -> np.ndarray:
    """Per-channel budget in normalised units for one case."""
    if eps_raw is not None:
        return np.full(len(raw_per_norm), eps_raw, dtype=np.float64) / np.asarray(raw_per_norm, dtype=np.float64)
    return (DEFAULT_EPS if eps is None else eps) * np.asarray(window, dtype=np.float64)


def parse_roi(roi: str) -> tuple[str, int]:
    """`label`, `all` or `dilate:N` -> (kind, iterations)."""
    if roi in ("label", "all"):
        return roi, 0
    if roi.startswith("dilate:") and roi[7:].isdigit() and int(roi[7:]) > 0:
        return "dilate", int(roi[7:])
    raise VoxShieldError(f"--roi must be label, all or dilate:N with N a positive integer; got {roi!r}")


def roi_mask(seg: np.ndarray, nonzero_any: np.ndarray, roi: str) -> np.ndarray:
    """Voxels delta may change: the labels (paper default), the whole image, or labels grown by N voxels.

    Always restricted to voxels that are nonzero in some channel: all-zero voxels decide nnU-Net's crop box.
    """
    kind, n = parse_roi(roi)
    if kind == "all":
        region = np.ones_like(nonzero_any, dtype=bool)
    else:
        region = seg > 0
        if kind == "dilate":
            region = binary_dilation(region, iterations=n)
    return region & nonzero_any


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Voxels within `width` voxels (6-connected steps) of a label boundary, on both sides of it.

    A victim that has learnt a label code errs almost only here (the code says which label, not exactly where it
    ends), so this is where an error-minimising refinement of a fixed code has something left to do.
    """
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        step = np.diff(labels, axis=axis) != 0
        before, after = [slice(None)] * labels.ndim, [slice(None)] * labels.ndim
        before[axis], after[axis] = slice(0, -1), slice(1, None)
        edge[tuple(before)] |= step
        edge[tuple(after)] |= step
    return binary_dilation(edge, iterations=width - 1) if width > 1 else edge


def project(delta: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor,
            headroom: torch.Tensor | None = None) -> torch.Tensor:
    """Clamp delta [C, ...] to [-eps_c, eps_c] per channel, into the clip window's `headroom` [2, C, ...] when given
    (lower, upper: so nnU-Net's normalisation passes delta unchanged), and zero it outside the mask [...]."""
    bound = eps.to(delta).view(-1, *([1] * (delta.ndim - 1)))
    delta = torch.maximum(torch.minimum(delta, bound), -bound)
    if headroom is not None:
        room = headroom.to(delta)
        delta = torch.maximum(torch.minimum(delta, room[1]), room[0])
    return delta * mask.to(delta)


def movable(headroom: np.ndarray | None, shape) -> np.ndarray:
    """Voxels that some channel can move without leaving its clip window (all voxels without a window)."""
    if headroom is None:
        return np.ones(shape, dtype=bool)
    return ((headroom[0] < 0) | (headroom[1] > 0)).any(0)
