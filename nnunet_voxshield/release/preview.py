"""A one-page PNG that lets a person see both promises at once: the perturbation is invisible in the images, yet it
changes the slice-to-slice spectrum that VoxShield's ZDiv term disrupts."""
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure  # an Agg canvas of its own: no pyplot state, no display needed

from nnunet_voxshield.job.atomic import atomic_write
from nnunet_voxshield.method.objectives import check_slice_axis

ProfileFn = Callable[[torch.Tensor, int], torch.Tensor]


def save_preview(path, clean: np.ndarray, protected: np.ndarray, slice_axis: int, title: str,
                 zdiv_profile_fn: ProfileFn) -> Path:
    """Write the preview of channel 0 of `clean` / `protected` ([C, X, Y, Z]) atomically as PNG; return the path.

    Rows: clean, protected and the amplified delta at three adjacent slices through the middle along `slice_axis`
    (a spatial axis 0..2; adjacent because ZDiv compares neighbouring slices), then the inter-slice spectral
    difference profile (`zdiv_profile_fn`, e.g. nnunet_voxshield.method.objectives.zdiv_profile) of clean, protected and
    delta along that axis.
    """
    clean, protected = _channel0(clean, protected, slice_axis)
    delta = protected - clean
    shown = _middle_slices(clean.shape[slice_axis])

    low, high = np.percentile(clean, [0.5, 99.5])
    high = high if high > low else low + 1.0
    delta_max = float(np.abs(delta).max()) or 1.0
    amplification = (high - low) / (2 * delta_max)

    fig = Figure(figsize=(9, 11), dpi=100, layout="constrained")
    grid = fig.add_gridspec(4, len(shown), height_ratios=[1, 1, 1, 1.1])
    rows = [("clean", clean, dict(cmap="gray", vmin=low, vmax=high)),
            ("protected", protected, dict(cmap="gray", vmin=low, vmax=high)),
            (f"delta x{amplification:.0f} (colour range +-{delta_max:.3g})", delta,
             dict(cmap="RdBu_r", vmin=-delta_max, vmax=delta_max))]
    for r, (label, volume, style) in enumerate(rows):
        for c, index in enumerate(shown):
            ax = fig.add_subplot(grid[r, c])
            image = ax.imshow(np.take(volume, index, axis=slice_axis).T, origin="lower", **style)
            ax.set_title(f"{label}\nslice {index} (axis {slice_axis})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8)

    profile_ax = fig.add_subplot(grid[3, :])
    for name, volume, style in (("clean", clean, "-"), ("protected", protected, "-"), ("delta", delta, ":")):
        profile = zdiv_profile_fn(torch.from_numpy(volume.astype(np.float32)), slice_axis)
        profile_ax.plot(np.asarray(profile.detach().cpu(), dtype=np.float64).ravel(), style, label=name)
    for index in shown[:-1]:
        profile_ax.axvline(index, color="grey", linewidth=0.5)
    profile_ax.set_xlabel(f"slice pair (i, i+1) along axis {slice_axis}")
    profile_ax.set_ylabel("RMS |FFT(slice i)| - |FFT(slice i+1)|")
    profile_ax.set_title("inter-slice spectral difference (channel 0)", fontsize=9)
    profile_ax.legend(fontsize=8)
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    return Path(path)


def _channel0(clean, protected, slice_axis: int) -> tuple[np.ndarray, np.ndarray]:
    clean, protected = np.asarray(clean, dtype=np.float64), np.asarray(protected, dtype=np.float64)
    if clean.ndim != 4 or clean.shape != protected.shape:
        raise ValueError(f"clean and protected must both be [C, X, Y, Z] of one shape; got {clean.shape} and "
                         f"{protected.shape}")
    check_slice_axis(slice_axis)
    if clean.shape[1 + slice_axis] < 2:
        raise ValueError(f"need at least 2 slices along axis {slice_axis}; got shape {clean.shape}")
    return clean[0], protected[0]


def _middle_slices(n: int) -> list[int]:
    middle = n // 2
    return [i for i in (middle - 1, middle, middle + 1) if 0 <= i < n]
