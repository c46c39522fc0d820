"""nnU-Net's data resampling as an exact, differentiable torch operator.

nnU-Net resamples normalised images with `resample_data_or_seg_to_shape`: skimage `resize` (order-3 spline with
prefilter, mode 'edge', no anti-aliasing) on the whole volume, or, when the spacing is anisotropic, on every slice
in-plane followed by `map_coordinates` of order `order_z` (0 = nearest) along the low-resolution axis. Both are
tensor products of 1-D linear maps, so the linear part is three matrices, one per axis. Each matrix is obtained by
running the very same scipy/skimage operation on identity basis vectors, which makes it exact by construction
(up to float rounding), not an approximation such as trilinear interpolation.

The matrices are stored and applied banded (`BandedMatrix`). An order-3 spline with prefilter is an IIR filter
(impulse response decaying like 0.268^k) followed by 4-tap interpolation, so in each row only a few dozen entries
around the diagonal exceed 1e-12 of the row's largest; the nearest-neighbour matrix has one entry per row. The
entries below `BAND_TOL` of their row's largest are dropped (far below float32 rounding; float64 results move by
less than about 1e-12 relative); every other entry is kept exactly. For a 512-voxel CT axis that is at most 42 of
512 columns per row, so the per-axis cost and the operator's memory grow with the axis length, not its square.
The two in-plane matrices are applied slab by slab (a few slices at a time), so no intermediate volume is made
between them, and the backward pass (the transposed matrices in reverse order) saves no tensor.

The only non-linear step is skimage's `clip=True`: the spline output is clipped to the value range of its input
(the whole channel volume, or each slice in the separate-z path). Consequences:
(a) to reproduce nnU-Net on a full image use `Resampler.like_nnunet` (linear map + the same clip);
(b) a perturbation delta is mapped with the linear part only (`__call__`): nnU-Net's output for x + delta equals
    `__call__(x) + __call__(delta)` except at the rare voxels where the spline overshoots the input's range
    (sharp edges next to the extreme values), which the clip then cuts.
"""
import math
from functools import lru_cache

import numpy as np
import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
from scipy.ndimage import map_coordinates
from skimage.transform import resize

from nnunet_voxshield.errors import VoxShieldError

SUPPORTED_RESAMPLING_FN = "resample_data_or_seg_to_shape"
BAND_TOL = 1e-12    # entries below this fraction of their row's largest magnitude are dropped
MIN_BLOCK_ROWS = 64  # output rows per block of a banded matrix, at least: fewer makes many small matrix products


def spline_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """Dense [n_out, n_in] matrix of skimage `resize` along one axis, exactly as nnU-Net calls it.

    Resizing the identity along axis 0 only (axis 1 keeps its size, where an interpolating spline sampled at its
    own knots is the identity) yields the response to every basis vector at once.
    """
    eye = np.eye(n_in, dtype=np.float64)
    return resize(eye, (n_out, n_in), order, mode="edge", anti_aliasing=False, clip=False)


def slice_axis_matrix(n_in: int, n_out: int, order_z: int) -> np.ndarray:
    """Dense [n_out, n_in] matrix of nnU-Net's `map_coordinates` step along the low-resolution axis (separate-z)."""
    scale = n_in / n_out
    rows = scale * (np.arange(n_out) + 0.5) - 0.5
    cols = np.arange(n_in, dtype=np.float64)
    coords = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    return map_coordinates(np.eye(n_in, dtype=np.float64), coords, order=order_z, mode="nearest")


class BandedMatrix:
    """A [n_out, n_in] matrix whose rows are nonzero on a short run of columns, applied along one tensor axis.

    Built from a dense matrix: in each row, the entries from the first to the last one above `tol` times the row's
    largest magnitude are kept exactly, the others (all below that bound) are set to zero. The rows are grouped into
    blocks of consecutive rows; a block stores the dense sub-matrix over the union of its rows' column runs, so one
    matrix product per block applies it. `T` is the exact transpose (of the kept matrix), built the same way.
    """

    def __init__(self, dense: np.ndarray, tol: float = BAND_TOL):
        dense = np.asarray(dense, dtype=np.float64)
        self.n_out, self.n_in = dense.shape
        mag = np.abs(dense)
        keep = mag > tol * mag.max(axis=1, keepdims=True)
        keep[~keep.any(axis=1), 0] = True  # an all-zero row: keep one (zero) entry
        first = keep.argmax(axis=1)
        last = self.n_in - 1 - keep[:, ::-1].argmax(axis=1)
        cols = np.arange(self.n_in)
        kept = np.where((cols >= first[:, None]) & (cols <= last[:, None]), dense, 0.0)
        self.width = int((last - first + 1).max())  # widest row run
        step = max(self.n_in / max(self.n_out, 1), 1e-9)  # columns advanced per row
        # a block's columns span about width + rows * step: rows ~ 2 width / step keeps the products large while
        # computing at most about 3x the kept entries (measured fastest on a 512 -> 546 axis, 2 CPU cores)
        rows = int(min(self.n_out, max(MIN_BLOCK_ROWS, math.ceil(2 * self.width / step))))
        self.blocks = []  # (first row, end row, first column, end column, [rows, columns] float64)
        for r0 in range(0, self.n_out, rows):
            r1 = min(self.n_out, r0 + rows)
            lo, hi = int(first[r0:r1].min()), int(last[r0:r1].max()) + 1
            self.blocks.append((r0, r1, lo, hi, np.ascontiguousarray(kept[r0:r1, lo:hi])))
        self._transpose = None
        self._tensors = {}

    @property
    def T(self) -> "BandedMatrix":
        if self._transpose is None:
            t = BandedMatrix(self.to_dense().T, tol=0.0)  # every nonzero of the kept matrix: an exact transpose
            t._transpose, self._transpose = self, t
        return self._transpose

    @property
    def nbytes(self) -> int:
        return sum(b[4].nbytes for b in self.blocks)

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_out, self.n_in))
        for r0, r1, lo, hi, w in self.blocks:
            out[r0:r1, lo:hi] = w
        return out

    def _blocks_as(self, dtype, device) -> list:
        key = (dtype, torch.device(device))
        if key not in self._tensors:
            self._tensors[key] = [(r0, r1, lo, hi, torch.tensor(w, dtype=dtype, device=device))
                                  for r0, r1, lo, hi, w in self.blocks]
        return self._tensors[key]

    def apply(self, x: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix applied along axis `dim` (>= 0) of x, into `out` (contiguous) if given. No autograd."""
        shape = x.shape
        if shape[dim] != self.n_in:
            raise ValueError(f"axis {dim} has {shape[dim]} entries, the matrix expects {self.n_in}")
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
        x3 = x.reshape(outer, self.n_in, inner)
        out = x.new_empty(outer, self.n_out, inner) if out is None else out.view(outer, self.n_out, inner)
        blocks = self._blocks_as(x.dtype, x.device)
        if inner == 1:  # the last axis: [outer, columns] @ block.T
            x2, out2 = x3.view(outer, self.n_in), out.view(outer, self.n_out)
            for r0, r1, lo, hi, w in blocks:
                torch.matmul(x2[:, lo:hi], w.T, out=out2[:, r0:r1])
        elif outer == 1:  # the first axis: block @ [columns, inner]
            x2, out2 = x3.view(self.n_in, inner), out.view(self.n_out, inner)
            for r0, r1, lo, hi, w in blocks:
                torch.matmul(w, x2[lo:hi], out=out2[r0:r1])
        else:  # a middle axis: block @ [outer, columns, inner], batched over outer
            for r0, r1, lo, hi, w in blocks:
                out[:, r0:r1] = torch.matmul(w, x3[:, lo:hi])
        return out.view(*shape[:dim], self.n_out, *shape[dim + 1:])


SLAB_ELEMENTS = 2 ** 22  # in-plane resampling runs on slabs of slices of about this many output voxels (16 MiB
# in float32): larger slabs make fewer, larger matrix products, which 2 shared CPU cores run with far less waiting


def _in_plane(x: torch.Tensor, y_op, x_op) -> torch.Tensor:
    """[N, Y, X] -> [N, Y', X'], a slab of slices at a time: the intermediate is one slab, never a volume."""
    if y_op is None and x_op is None:
        return x
    n, ny, nx = x.shape
    ny_out = ny if y_op is None else y_op.n_out
    nx_out = nx if x_op is None else x_op.n_out
    x = x.contiguous()
    out = x.new_empty(n, ny_out, nx_out)
    step = max(1, SLAB_ELEMENTS // (ny_out * nx_out))
    for s0 in range(0, n, step):
        slab, target = x[s0:s0 + step], out[s0:s0 + step]
        if y_op is not None:
            slab = y_op.apply(slab, 1, out=target if x_op is None else None)
        if x_op is not None:
            x_op.apply(slab, 2, out=target)
    return out


def _separable(x: torch.Tensor, ops: tuple, in_plane_first: bool) -> torch.Tensor:
    """[B, Z, Y, X] through the per-axis matrices `ops` (z, y, x; None = identity), in-plane axes slab by slab."""
    z_op, y_op, x_op = ops
    if z_op is not None and not in_plane_first:
        x = z_op.apply(x, 1)
    b, nz = x.shape[:2]
    x = _in_plane(x.reshape(b * nz, *x.shape[2:]), y_op, x_op)
    x = x.view(b, nz, *x.shape[1:])
    if z_op is not None and in_plane_first:
        x = z_op.apply(x, 1)
    return x


class _Separable(torch.autograd.Function):
    """y = (Z (x) Y (x) X) x on [B, Z, Y, X]; the gradient is the transposed product, in reverse order.

    No tensor is saved for the backward pass, and the backward pass is itself this function (so it is also
    differentiable)."""

    @staticmethod
    def forward(ctx, x, ops: tuple, in_plane_first: bool):
        ctx.ops, ctx.in_plane_first = ops, in_plane_first
        return _separable(x, ops, in_plane_first)

    @staticmethod
    def backward(ctx, grad):
        transposed = tuple(None if op is None else op.T for op in ctx.ops)
        return _Separable.apply(grad, transposed, not ctx.in_plane_first), None, None


@lru_cache(maxsize=512)
def banded_spline_matrix(n_in: int, n_out: int, order: int) -> BandedMatrix:
    return BandedMatrix(spline_matrix(n_in, n_out, order))


@lru_cache(maxsize=512)
def banded_slice_axis_matrix(n_in: int, n_out: int, order_z: int) -> BandedMatrix:
    return BandedMatrix(slice_axis_matrix(n_in, n_out, order_z))


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
        self.banded = [self._axis_operator(a) for a in range(3)]  # per axis; None = identity

    def _axis_kind(self, a: int) -> str | None:
        if self.is_identity:
            return None
        if self.do_separate_z and a == self.axis:
            # nnU-Net skips map_coordinates when the slice count does not change
            return None if self.shape_in[a] == self.shape_out[a] else "slice"
        return "spline"

    def _axis_operator(self, a: int) -> BandedMatrix | None:
        kind, n_in, n_out = self._axis_kind(a), self.shape_in[a], self.shape_out[a]
        if kind is None:
            return None
        return (banded_slice_axis_matrix(n_in, n_out, self.order_z) if kind == "slice"
                else banded_spline_matrix(n_in, n_out, self.order))

    def matrices(self, dtype=torch.float32, device="cpu") -> list:
        """The exact dense per-axis [n_out, n_in] matrices (None = identity), computed on each call.

        For reference and tests: resampling itself uses the banded form (`banded`), which equals these up to the
        dropped entries below BAND_TOL of their row's largest.
        """
        out = []
        for a in range(3):
            kind, n_in, n_out = self._axis_kind(a), self.shape_in[a], self.shape_out[a]
            m = None if kind is None else (slice_axis_matrix(n_in, n_out, self.order_z) if kind == "slice"
                                           else spline_matrix(n_in, n_out, self.order))
            out.append(None if m is None else torch.tensor(m, dtype=dtype, device=device))
        return out

    def _linear(self, x: torch.Tensor, axes) -> torch.Tensor:
        """The matrices of `axes` (a subset of 0, 1, 2) applied to x [..., Z, Y, X], differentiably."""
        ops = tuple(self.banded[a] if a in axes else None for a in range(3))
        if all(op is None for op in ops):
            return x
        lead = x.shape[:-3]
        y = _Separable.apply(x.reshape(-1, *x.shape[-3:]), ops, True)
        return y.view(*lead, *y.shape[1:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Linear part of nnU-Net's resampling: differentiable, for perturbations."""
        if tuple(x.shape[-3:]) != self.shape_in:
            raise ValueError(f"expected spatial shape {self.shape_in}, got {tuple(x.shape[-3:])}")
        if self.is_identity:
            return x
        return self._linear(x, (0, 1, 2))

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
            y = self._linear(flat, [a for a in range(3) if a != self.axis]).clamp(lo, hi)
            out = self._linear(y, [self.axis])
        return out.reshape(*x.shape[:-3], *self.shape_out)
