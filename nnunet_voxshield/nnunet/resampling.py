"""nnU-Net's data resampling as an exact, differentiable torch operator.

nnU-Net resamples normalised images with `resample_data_or_seg_to_shape`: skimage `resize` (order-3 spline with
prefilter, mode 'edge', no anti-aliasing) on the whole volume, or, when the spacing is anisotropic, on every slice
in-plane followed by `map_coordinates` of order `order_z` (0 = nearest) along the low-resolution axis. Both are
tensor products of 1-D linear maps, so the linear part is three matrices, one per axis. Each matrix is obtained by
running the very same scipy/skimage operation on identity basis vectors, which makes it exact by construction
(up to float rounding), not an approximation such as trilinear interpolation.

The only non-linear step is skimage's `clip=True`: the spline output is clipped to the value range of its input
(the whole channel volume, or each slice in the separate-z path). Consequences:
(a) to reproduce nnU-Net on a full image use `Resampler.like_nnunet` (linear map + the same clip);
(b) a perturbation delta is mapped with the linear part only (`__call__`): nnU-Net's output for x + delta equals
    `__call__(x) + __call__(delta)` except at the rare voxels where the spline overshoots the input's range
    (sharp edges next to the extreme values), which the clip then cuts.
"""
from functools import lru_cache

import numpy as np
import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
from scipy.ndimage import map_coordinates
from skimage.transform import resize

from nnunet_voxshield.errors import VoxShieldError

SUPPORTED_RESAMPLING_FN = "resample_data_or_seg_to_shape"


@lru_cache(maxsize=256)
def spline_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """[n_out, n_in] matrix of skimage `resize` along one axis, exactly as nnU-Net calls it.

    Resizing the identity along axis 0 only (axis 1 keeps its size, where an interpolating spline sampled at its
    own knots is the identity) yields the response to every basis vector at once.
    """
    eye = np.eye(n_in, dtype=np.float64)
    m = resize(eye, (n_out, n_in), order, mode="edge", anti_aliasing=False, clip=False)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=256)
def slice_axis_matrix(n_in: int, n_out: int, order_z: int) -> np.ndarray:
    """[n_out, n_in] matrix of nnU-Net's `map_coordinates` step along the low-resolution axis (separate-z path)."""
    scale = n_in / n_out
    rows = scale * (np.arange(n_out) + 0.5) - 0.5
    cols = np.arange(n_in, dtype=np.float64)
    coords = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    m = map_coordinates(np.eye(n_in, dtype=np.float64), coords, order=order_z, mode="nearest")
    m.setflags(write=False)
    return m


def resampling_kwargs_of(configuration_manager) -> dict:
    """The data-resampling kwargs from a ConfigurationManager (or a plain kwargs dict), after checking the function."""
    if isinstance(configuration_manager, dict):
        return dict(configuration_manager)
    name = configuration_manager.configuration["resampling_fn_data"]
    if name != SUPPORTED_RESAMPLING_FN:
        raise VoxShieldError(f"plans use resampling_fn_data '{name}'; VoxShield reproduces only "
                             f"'{SUPPORTED_RESAMPLING_FN}' (nnU-Net's default): re-plan with the default planner")
    return dict(configuration_manager.configuration["resampling_fn_data_kwargs"])


class Resampler:
    """x on the cropped grid (normalised units) -> x on the preprocessed grid, as nnU-Net resamples data.

    `configuration_manager` may be nnU-Net's ConfigurationManager or its `resampling_fn_data_kwargs` dict.
    Works on tensors shaped [..., *shape_in] (channels, or batch and channels, in front).
    """

    def __init__(self, shape_in, shape_out, spacing_in, spacing_out, configuration_manager):
        kwargs = resampling_kwargs_of(configuration_manager)
        self.shape_in = tuple(int(s) for s in shape_in)
        self.shape_out = tuple(int(s) for s in shape_out)
        self.order = int(kwargs.get("order", 3))
        self.order_z = int(kwargs.get("order_z", 0))
        self.is_identity = self.shape_in == self.shape_out
        self.do_separate_z, self.axis = determine_do_sep_z_and_axis(
            kwargs.get("force_separate_z", False), spacing_in, spacing_out,
            kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))
        self._matrices_np = [self._axis_matrix(a) for a in range(3)]
        self._matrices = {}

    def _axis_matrix(self, a: int) -> np.ndarray | None:
        n_in, n_out = self.shape_in[a], self.shape_out[a]
        if self.is_identity:
            return None
        if self.do_separate_z and a == self.axis:
            # nnU-Net skips map_coordinates when the slice count does not change
            return None if n_in == n_out else slice_axis_matrix(n_in, n_out, self.order_z)
        return spline_matrix(n_in, n_out, self.order)

    def matrices(self, dtype=torch.float32, device="cpu") -> list:
        """Per-axis [n_out, n_in] tensors (None = identity), cached per dtype and device."""
        key = (dtype, torch.device(device))
        if key not in self._matrices:
            self._matrices[key] = [None if m is None else torch.tensor(m, dtype=dtype, device=device)
                                   for m in self._matrices_np]
        return self._matrices[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Linear part of nnU-Net's resampling: differentiable, for perturbations."""
        if tuple(x.shape[-3:]) != self.shape_in:
            raise ValueError(f"expected spatial shape {self.shape_in}, got {tuple(x.shape[-3:])}")
        if self.is_identity:
            return x
        for a, m in enumerate(self.matrices(x.dtype, x.device)):
            if m is not None:
                x = torch.movedim(torch.movedim(x, a - 3, -1) @ m.T, -1, a - 3)
        return x

    def like_nnunet(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map plus skimage's clip to the input's range: reproduces nnU-Net on whole images."""
        if self.is_identity:
            return x
        flat = x.reshape(-1, *self.shape_in)
        if not self.do_separate_z:
            lo = flat.amin(dim=(1, 2, 3)).view(-1, 1, 1, 1)
            hi = flat.amax(dim=(1, 2, 3)).view(-1, 1, 1, 1)
            out = self(flat).clamp(lo, hi)
        else:
            # the clip happens per slice in-plane, before the (nearest-neighbour) step along the slice axis
            in_plane = tuple(d for d in (1, 2, 3) if d != self.axis + 1)
            lo, hi = flat.amin(dim=in_plane, keepdim=True), flat.amax(dim=in_plane, keepdim=True)
            mats = self.matrices(x.dtype, x.device)
            y = flat
            for a in range(3):
                if a != self.axis and mats[a] is not None:
                    y = torch.movedim(torch.movedim(y, a + 1, -1) @ mats[a].T, -1, a + 1)
            y = y.clamp(lo, hi)
            if mats[self.axis] is not None:
                y = torch.movedim(torch.movedim(y, self.axis + 1, -1) @ mats[self.axis].T, -1, self.axis + 1)
            out = y
        return out.reshape(*x.shape[:-3], *self.shape_out)
