"""Differentiable stand-in for nnU-Net's training augmentation (expectation over transformation).

Optimising the perturbation through random augmentations makes it survive the augmentation a victim's
stock nnU-Net training applies. The pipeline below mirrors nnUNetTrainer.get_training_transforms
(nnunetv2 2.8.x, batchgeneratorsv2) in order, probabilities and ranges, but is written in pure torch so
that gradients reach the data:

    spatial (rotation p=0.2, scaling p=0.2 in [0.7, 1.4] shared by all axes, no elastic deformation;
             in-plane only when nnU-Net does dummy-2D augmentation)
    Gaussian noise          p=0.1   std ~ U(0, 0.1), one std for all channels
    Gaussian blur           p=0.2   per channel p=0.5, sigma ~ U(0.5, 1) per axis
    multiplicative bright.  p=0.15  per channel factor in [0.75, 1.25]
    contrast                p=0.15  per channel factor in [0.75, 1.25], range preserved
    low resolution          p=0.25  per channel p=0.5, zoom ~ U(0.5, 1) shared by axes (not axis 0 in dummy 2D)
    inverted gamma          p=0.1   gamma in [0.7, 1.5], statistics retained
    gamma                   p=0.3   gamma in [0.7, 1.5], statistics retained
    mirroring               p=0.5 per allowed axis

Factors "in [lo, hi]" are drawn like batchgeneratorsv2's BGContrast: half the time below 1, half above.
Known simplifications: the segmentation is resampled with nearest neighbour (nnU-Net takes the argmax of
linearly interpolated one-hot maps), and the blur kernel is cut at 3 sigma of the largest sigma.
"""
import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from nnunet_voxshield.errors import VoxShieldError

DEFAULT_PROBABILITIES = {
    "rotation": 0.2, "scaling": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15,
    "lowres": 0.25, "gamma_inverted": 0.1, "gamma": 0.3, "mirror": 0.5,
}
"""nnU-Net's apply probabilities; "mirror" is per allowed axis."""

SCALING_RANGE = (0.7, 1.4)
NOISE_STD_RANGE = (0.0, 0.1)
BLUR_SIGMA_RANGE = (0.5, 1.0)
BLUR_P_PER_CHANNEL = 0.5
BRIGHTNESS_RANGE = (0.75, 1.25)
CONTRAST_RANGE = (0.75, 1.25)
LOWRES_ZOOM_RANGE = (0.5, 1.0)
LOWRES_P_PER_CHANNEL = 0.5
GAMMA_RANGE = (0.7, 1.5)
_STAT_EPS = 1e-7

RandomRange = Union[float, Tuple[float, float]]


class EOTAugment:
    """Random, differentiable nnU-Net-style augmentation of a patch batch, with parameters drawn per sample.

    rotation_for_DA, mirror_axes and do_dummy_2d_data_aug are what
    nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size returns. `strength` multiplies
    every apply probability (capped at 1): 1 reproduces nnU-Net, 0 disables everything. `probabilities`
    overrides single entries of DEFAULT_PROBABILITIES (after strength). `generator` is a CPU torch.Generator
    or an int seed; None uses torch's global random state. All draws happen on the CPU (the parameters are a
    handful of numbers; the noise volume is moved to the data's device), so a seed gives the same
    augmentations on every device. `hard` is the share of samples in which Gaussian noise, blur and low
    resolution are all forced on (blur and low resolution on every channel), so that a perturbation is also
    optimised for the degradations that shortcut-squeezing attackers apply; 0 draws exactly as nnU-Net."""

    def __init__(self, rotation_for_DA: RandomRange, mirror_axes: Optional[Sequence[int]],
                 do_dummy_2d_data_aug: bool, strength: float = 1.0,
                 generator: Union[torch.Generator, int, None] = None,
                 probabilities: Optional[Mapping[str, float]] = None, hard: float = 0.0):
        if not strength >= 0:
            raise VoxShieldError(f"augmentation strength must be >= 0, got {strength}")
        if not 0 <= hard <= 1:
            raise VoxShieldError(f"the share of hard augmentation draws must be in [0, 1], got {hard}")
        self.hard = float(hard)
        self.rotation_range = _as_range(rotation_for_DA)
        self.mirror_axes = tuple(int(a) for a in (mirror_axes or ()))
        self.dummy_2d = bool(do_dummy_2d_data_aug)
        self.probabilities = {k: min(1.0, p * strength) for k, p in DEFAULT_PROBABILITIES.items()}
        for key, p in (probabilities or {}).items():
            if key not in DEFAULT_PROBABILITIES or not 0 <= p <= 1:
                raise VoxShieldError(f"bad augmentation probability {key}={p}: "
                                     f"use keys {sorted(DEFAULT_PROBABILITIES)} with values in [0, 1]")
            self.probabilities[key] = float(p)
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("EOTAugment draws its parameters on the CPU: pass a CPU torch.Generator or a seed")
        self.generator = generator

    # ------------------------------------------------------------------ random draws

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, dtype=torch.float64)

    def _coin(self, key: str, *shape) -> torch.Tensor:
        return self._rand(*shape) < self.probabilities[key]

    def _uniform(self, lo_hi: Tuple[float, float], *shape) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * self._rand(*shape)

    def _factor(self, lo_hi: Tuple[float, float], *shape) -> torch.Tensor:
        """batchgeneratorsv2's BGContrast: with probability 1/2 a factor below 1 (if the range allows)."""
        lo, hi = lo_hi
        below = (self._rand(*shape) < 0.5) & (lo < 1)
        return torch.where(below, self._uniform((lo, min(1.0, hi)), *shape),
                           self._uniform((max(lo, 1.0), hi), *shape))

    # ------------------------------------------------------------------ pipeline

    def __call__(self, data: torch.Tensor, seg: torch.Tensor,
                 patch_size: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """data [B, C, *spatial], seg [B, 1, *spatial] -> augmented (data, seg), differentiable in data.

        With `patch_size` (smaller than the input, as nnU-Net's larger initial patch) the centre patch is
        sampled from the whole input, so rotations pull in real neighbouring voxels instead of zero padding."""
        if data.ndim not in (4, 5) or seg.ndim != data.ndim or seg.shape[0] != data.shape[0] \
                or seg.shape[2:] != data.shape[2:]:
            raise ValueError(f"expected data [B, C, *spatial] and seg [B, 1, *spatial] with 2 or 3 spatial dims, "
                             f"got {tuple(data.shape)} and {tuple(seg.shape)}")
        out_size = tuple(patch_size) if patch_size is not None else tuple(data.shape[2:])
        if len(out_size) != data.ndim - 2 or any(o > s for o, s in zip(out_size, data.shape[2:])):
            raise ValueError(f"patch_size {out_size} must not exceed the input's spatial shape {data.shape[2:]}")
        data, seg = self._spatial(data, seg, out_size)
        # drawn only when asked for, so that hard=0 consumes the random stream exactly as before
        hard = self._rand(data.shape[0]) < self.hard if self.hard > 0 else torch.zeros(data.shape[0], dtype=torch.bool)
        data = self._noise(data, hard)
        data = self._blur(data, hard)
        data = self._brightness(data)
        data = self._contrast(data)
        data = self._low_resolution(data, hard)
        data = self._gamma(data, "gamma_inverted", invert=True)
        data = self._gamma(data, "gamma", invert=False)
        return self._mirror(data, seg)

    def _spatial(self, data, seg, out_size):
        b, dim = data.shape[0], data.ndim - 2
        rotate, scale = self._coin("rotation", b), self._coin("scaling", b)
        angles = torch.where(rotate[:, None], self._uniform(self.rotation_range, b, 3), 0.0)
        scales = torch.where(scale, self._uniform(SCALING_RANGE, b), 1.0)
        warped = (rotate | scale).nonzero().flatten().to(data.device)
        data_out, seg_out = _center_crop(data, out_size), _center_crop(seg, out_size)
        if warped.numel() == 0:
            return data_out, seg_out
        matrices = _affine_matrices(angles, scales, dim, self.dummy_2d)[warped.cpu()]
        theta = _grid_sample_theta(matrices, data.shape[2:], out_size).to(data)
        grid = F.affine_grid(theta, [warped.numel(), 1, *out_size], align_corners=False)
        new_data = F.grid_sample(data[warped], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        new_seg = F.grid_sample(seg[warped].to(grid.dtype), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False).round().to(seg.dtype)
        return data_out.index_copy(0, warped, new_data), seg_out.index_copy(0, warped, new_seg)

    def _noise(self, data, hard):
        b = data.shape[0]
        std = torch.where(self._coin("noise", b) | hard, self._uniform(NOISE_STD_RANGE, b), 0.0)
        if not bool((std > 0).any()):
            return data
        noise = torch.randn(data.shape, generator=self.generator, dtype=data.dtype).to(data.device)
        return data + noise * _per_sample(std, data)

    def _blur(self, data, hard):
        b, c, dim = data.shape[0], data.shape[1], data.ndim - 2
        chosen = (self._coin("blur", b)[:, None] & (self._rand(b, c) < BLUR_P_PER_CHANNEL)) | hard[:, None]
        sigmas = self._uniform(BLUR_SIGMA_RANGE, b, c, dim)
        return _on_rows(data, chosen, _gaussian_blur_rows, sigmas)

    def _brightness(self, data):
        b, c = data.shape[:2]
        factors = torch.where(self._coin("brightness", b)[:, None], self._factor(BRIGHTNESS_RANGE, b, c), 1.0)
        return data * _per_sample(factors, data)

    def _contrast(self, data):
        b, c = data.shape[:2]
        chosen = self._coin("contrast", b)[:, None].expand(b, c)
        return _on_rows(data, chosen, _contrast_rows, self._factor(CONTRAST_RANGE, b, c))

    def _low_resolution(self, data, hard):
        b, c = data.shape[:2]
        chosen = (self._coin("lowres", b)[:, None] & (self._rand(b, c) < LOWRES_P_PER_CHANNEL)) | hard[:, None]
        zooms = self._uniform(LOWRES_ZOOM_RANGE, b, c)
        kept_axes = (0,) if self.dummy_2d and data.ndim == 5 else ()
        return _on_rows(data, chosen, lambda rows, z: _low_resolution_rows(rows, z, kept_axes), zooms)

    def _gamma(self, data, key, invert):
        b, c = data.shape[:2]
        chosen = self._coin(key, b)[:, None].expand(b, c)
        return _on_rows(data, chosen, lambda rows, g: _gamma_rows(rows, g, invert), self._factor(GAMMA_RANGE, b, c))

    def _mirror(self, data, seg):
        flips = self._coin("mirror", data.shape[0], max(len(self.mirror_axes), 1))
        for i, axis in enumerate(self.mirror_axes):
            if axis >= data.ndim - 2:
                raise ValueError(f"mirror axis {axis} does not exist for a {data.ndim - 2}D patch")
            flip = flips[:, i].to(data.device)
            data = torch.where(_per_sample(flip, data), data.flip(axis + 2), data)
            seg = torch.where(_per_sample(flip, seg), seg.flip(axis + 2), seg)
        return data, seg


# ---------------------------------------------------------------------- helpers

def _as_range(value: RandomRange) -> Tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    lo, hi = value
    return float(lo), float(hi)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast [B] or [B, C] values over the spatial dims of `like`."""
    values = values.to(like.device, like.dtype if values.is_floating_point() else values.dtype)
    return values.reshape(*values.shape, *([1] * (like.ndim - values.ndim)))


def _on_rows(data: torch.Tensor, chosen: torch.Tensor, fn, params: torch.Tensor) -> torch.Tensor:
    """Apply fn(rows [N, *spatial], params [N, ...]) to the chosen (sample, channel) rows only, out of place."""
    rows = chosen.flatten().nonzero().flatten()
    if rows.numel() == 0:
        return data
    flat = data.flatten(0, 1)
    rows_here = rows.to(data.device)
    changed = fn(flat[rows_here], params.flatten(0, 1)[rows].to(data.device, data.dtype))
    return flat.index_copy(0, rows_here, changed).view_as(data)


def _center_crop(x: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    starts = [(s - o) // 2 for s, o in zip(x.shape[2:], out_size)]
    return x[(slice(None), slice(None), *[slice(a, a + o) for a, o in zip(starts, out_size)])]


def _rotation(angle: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """[B, 3, 3] rotations in the plane of axes (i, j), as batchgeneratorsv2's create_affine_matrix_3d."""
    m = torch.eye(3, dtype=angle.dtype).repeat(angle.shape[0], 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = cos, -sin, sin, cos
    return m


def _affine_matrices(angles, scales, dim, dummy_2d) -> torch.Tensor:
    """Per-sample voxel-space matrices mapping output to input coordinates (array axis order).
    3D: Rz Ry Rx S with one angle per axis; dummy 2D and 2D patches: one in-plane rotation and in-plane scale."""
    if dim == 2 or dummy_2d:
        m = _rotation(angles[:, 0], 1, 2) @ torch.diag_embed(torch.stack(
            [torch.ones_like(scales), scales, scales], dim=1))
        return m[:, 1:, 1:] if dim == 2 else m
    rx, ry, rz = _rotation(angles[:, 0], 1, 2), _rotation(angles[:, 1], 2, 0), _rotation(angles[:, 2], 0, 1)
    return rz @ ry @ rx @ torch.diag_embed(scales[:, None].expand(-1, 3))


def _grid_sample_theta(matrices, in_size, out_size) -> torch.Tensor:
    """affine_grid's theta for a voxel-space matrix about the patch centre: normalised output coordinates ->
    voxels (x out/2) -> matrix -> normalised input coordinates (/ in/2), in grid_sample's reversed axis order."""
    to_voxels = torch.diag(torch.tensor([s / 2 for s in out_size], dtype=matrices.dtype))
    to_normalised = torch.diag(torch.tensor([2 / s for s in in_size], dtype=matrices.dtype))
    theta = (to_normalised @ matrices @ to_voxels).flip(-1, -2)
    return torch.cat([theta, torch.zeros(*theta.shape[:2], 1, dtype=theta.dtype)], dim=-1)


def _gaussian_blur_rows(rows: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each row with its own sigma per axis; reflect padding like batchgeneratorsv2."""
    n, dim = rows.shape[0], rows.ndim - 1
    radius = math.ceil(3 * BLUR_SIGMA_RANGE[1])
    taps = torch.arange(-radius, radius + 1, device=rows.device, dtype=rows.dtype)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    out = rows[None]  # rows become the channels of one grouped convolution
    for axis in range(dim):
        kernel = torch.exp(-0.5 * (taps[None] / sigmas[:, axis, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        shape = [n, 1] + [1] * dim
        shape[2 + axis] = taps.numel()
        pad = [0, 0] * dim
        pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="reflect"), kernel.reshape(shape), groups=n)
    return out[0]


def _contrast_rows(rows: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale each row about its mean, clipped back into its original [min, max]."""
    flat = rows.flatten(1)
    mean, low, high = (_per_sample(v, rows) for v in (flat.mean(1), flat.amin(1), flat.amax(1)))
    return torch.maximum(torch.minimum((rows - mean) * _per_sample(factors, rows) + mean, high), low)


def _low_resolution_rows(rows: torch.Tensor, zooms: torch.Tensor, kept_axes: Tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour downsampling then linear upsampling, per row (each has its own downsampled shape)."""
    size = rows.shape[1:]
    mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
    out = []
    for row, zoom in zip(rows, zooms.tolist()):
        small = [s if a in kept_axes else max(1, round(s * zoom)) for a, s in enumerate(size)]
        down = F.interpolate(row[None, None], size=small, mode="nearest-exact")
        out.append(F.interpolate(down, size=size, mode=mode, align_corners=False)[0, 0])
    return torch.stack(out)


def _gamma_rows(rows: torch.Tensor, gammas: torch.Tensor, invert: bool) -> torch.Tensor:
    """Gamma on each row rescaled to [0, 1], then the row's mean and std restored (p_retain_stats=1).
    The clamp keeps pow's gradient finite at the row minimum."""
    x = -rows if invert else rows
    flat = x.flatten(1)
    mean, std = _per_sample(flat.mean(1), x), _per_sample(flat.std(1), x)
    low, high = _per_sample(flat.amin(1), x), _per_sample(flat.amax(1), x)
    span = high - low
    unit = ((x - low) / span.clamp_min(_STAT_EPS)).clamp_min(_STAT_EPS)
    y = unit ** _per_sample(gammas, x) * span + low
    y_flat = y.flatten(1)
    y = (y - _per_sample(y_flat.mean(1), y)) * (std / _per_sample(y_flat.std(1), y).clamp_min(_STAT_EPS)) + mean
    return -y if invert else y
