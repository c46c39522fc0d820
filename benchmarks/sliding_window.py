"""Whole-case logits and input gradients with nnU-Net's own sliding window, tile by tile.

nnUNetPredictor runs every sliding-window method under `torch.inference_mode`, so gradients of a loss on the
logits of a whole case (semantic prediction disruption on the full volume, survival checks) need this module.
Tile placement (`compute_steps_for_sliding_window`), Gaussian weighting (`compute_gaussian`, sigma 1/8 of the patch,
value scaling 10) and zero padding of volumes smaller than the patch are nnU-Net's; mirroring is not done.

Why the gradient can be computed tile by tile: the aggregated logits are A = sum_t P_t(w * f(x_t)) / n, a fixed
linear combination of tile logits (P_t places a tile, w is the Gaussian, n the per-voxel weight sum). So for any
loss L(A), dL/dx = sum_t P_t^T J_t^T (w * P_t^T(dL/dA / n)): one forward without gradients gives A and dL/dA, then each
tile is recomputed with gradients and back-propagated alone. Peak memory is one tile's activations plus a few
case-sized buffers, however large the case.
"""
import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

GAUSSIAN_SIGMA_SCALE = 1. / 8  # the values nnUNetPredictor passes to compute_gaussian
GAUSSIAN_VALUE_SCALING = 10


class SlidingWindowGrad(NamedTuple):
    loss: torch.Tensor  # detached scalar L(A)
    logits: torch.Tensor  # A, the aggregated logits [K, *spatial] the loss was evaluated on
    grad: torch.Tensor  # dL/dx, same shape as x


@dataclass(frozen=True)
class _TileLayout:
    """Where the tiles go on the padded case, their weight, and the per-voxel weight sum."""
    padded_shape: tuple
    unpad: tuple  # slicer from the padded case back to the input's spatial extent, all channels kept
    regions: list  # per tile: spatial index into the padded case (an int first for 2D tiles on a 3D case)
    weight: torch.Tensor  # [*patch]
    normaliser: torch.Tensor  # [*padded spatial shape]


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pad(x: torch.Tensor, patch_size: Sequence[int]):
    """Zero-pad spatial axes shorter than the patch, centred, exactly as nnUNetPredictor does."""
    return pad_nd_image(x, list(patch_size), 'constant', {'value': 0}, True, None)


def _layout(x: torch.Tensor, patch_size: Sequence[int], tile_step_size: float, use_gaussian: bool) -> tuple:
    """The padded case and its tiles, placed as nnUNetPredictor._internal_get_sliding_window_slicers places them."""
    patch_size = tuple(int(p) for p in patch_size)
    spatial_ndim = x.ndim - 1
    if x.ndim not in (3, 4) or len(patch_size) not in (spatial_ndim, spatial_ndim - 1):
        raise ValueError(f"x must be [C, *spatial] with 2 or 3 spatial axes and patch_size must have as many "
                         f"entries (or one fewer for a 2D network on a 3D case); got x {tuple(x.shape)}, "
                         f"patch {patch_size}")
    padded, unpad = _pad(x, patch_size)
    unpad = (slice(None), *unpad[1:])  # keeps every channel: the logits have K, not C
    spatial = tuple(padded.shape[1:])
    leading = spatial[:spatial_ndim - len(patch_size)]  # the slice axis when a 2D network runs on a 3D case
    steps = compute_steps_for_sliding_window(spatial[len(leading):], patch_size, tile_step_size)
    regions = [(*lead, *(slice(s, s + p) for s, p in zip(starts, patch_size)))
               for lead in itertools.product(*(range(n) for n in leading))
               for starts in itertools.product(*steps)]
    dtype = _accumulation_dtype(x)
    if use_gaussian:
        weight = compute_gaussian(patch_size, sigma_scale=GAUSSIAN_SIGMA_SCALE,
                                  value_scaling_factor=GAUSSIAN_VALUE_SCALING, dtype=dtype, device=x.device)
    else:
        weight = torch.ones(patch_size, dtype=dtype, device=x.device)
    normaliser = torch.zeros(spatial, dtype=dtype, device=x.device)
    for region in regions:
        normaliser[region] += weight
    return padded, _TileLayout(spatial, unpad, regions, weight, normaliser)


def _autocast(x: torch.Tensor, enabled: bool | None):
    """Mixed precision on CUDA by default, like nnUNetPredictor; never on other devices unless asked."""
    if enabled is None:
        enabled = x.device.type == 'cuda'
    return torch.autocast(x.device.type) if enabled else contextlib.nullcontext()


def _tile_logits(network: torch.nn.Module, tile: torch.Tensor) -> torch.Tensor:
    """Network logits of one tile [C, *patch] -> [K, *patch]; with deep supervision, the full-resolution head."""
    out = network(tile[None])
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out[0]


def _tile(padded: torch.Tensor, region: tuple) -> torch.Tensor:
    return padded[(slice(None), *region)]


@torch.no_grad()
def sliding_window_logits(network: torch.nn.Module, x: torch.Tensor, patch_size: Sequence[int],
                          tile_step_size: float = 0.5, use_gaussian: bool = True,
                          autocast: bool | None = None) -> torch.Tensor:
    """Logits [K, *spatial] of a case x [C, *spatial], as nnUNetPredictor without mirroring but in float32.

    The network is used in whatever mode (train/eval) the caller left it in, and must live on x's device.
    """
    padded, layout = _layout(x, patch_size, tile_step_size, use_gaussian)
    logits = None
    with _autocast(x, autocast):
        for region in layout.regions:
            tile_logits = _tile_logits(network, _tile(padded, region)).to(layout.weight.dtype)
            if logits is None:
                logits = torch.zeros((tile_logits.shape[0], *layout.padded_shape), dtype=tile_logits.dtype,
                                     device=x.device)
            logits[(slice(None), *region)] += tile_logits * layout.weight
    logits /= layout.normaliser
    return logits[layout.unpad]


def sliding_window_vjp(network: torch.nn.Module, x: torch.Tensor, grad_logits: torch.Tensor,
                       patch_size: Sequence[int], tile_step_size: float = 0.5, use_gaussian: bool = True,
                       autocast: bool | None = None) -> torch.Tensor:
    """Vector-Jacobian product (dA/dx)^T grad_logits of the sliding-window logits A(x), one tile at a time.

    Only the input gradient is computed: network parameters get no .grad and the weight-gradient convolutions are
    skipped, which is what keeps a noise update near three network passes per tile. Tiles whose share of
    grad_logits is zero are skipped. Each tile's seed is rescaled by a power of two to its maximum, so that the
    tiny per-voxel gradients of a mean over a large case do not underflow under float16 autocast.
    """
    padded, layout = _layout(x, patch_size, tile_step_size, use_gaussian)
    seed = torch.zeros((grad_logits.shape[0], *layout.padded_shape), dtype=layout.weight.dtype, device=x.device)
    seed[layout.unpad] = grad_logits.to(seed.dtype)
    seed /= layout.normaliser
    grad = torch.zeros(padded.shape, dtype=layout.weight.dtype, device=x.device)
    for region in layout.regions:
        tile_seed = seed[(slice(None), *region)] * layout.weight
        largest = tile_seed.abs().max().item()
        if largest == 0:
            continue
        scale = 2.0 ** math.floor(math.log2(largest))
        tile = _tile(padded, region).detach().clone().requires_grad_(True)
        with torch.enable_grad(), _autocast(x, autocast):
            tile_logits = _tile_logits(network, tile)
        tile_grad, = torch.autograd.grad(tile_logits, tile, (tile_seed / scale).to(tile_logits.dtype))
        grad[(slice(None), *region)] += tile_grad.to(grad.dtype) * scale
    return grad[layout.unpad].to(x.dtype)


def sliding_window_backward(network: torch.nn.Module, x: torch.Tensor,
                            loss_fn: Callable[[torch.Tensor], torch.Tensor], patch_size: Sequence[int],
                            tile_step_size: float = 0.5, use_gaussian: bool = True,
                            autocast: bool | None = None) -> SlidingWindowGrad:
    """Loss L(A(x)) of the sliding-window logits of a whole case and its gradient dL/dx, in O(patch) memory.

    For a perturbation delta pass x + delta: the gradient with respect to delta is the gradient with respect to the
    network input. loss_fn maps logits [K, *spatial] to a scalar and must be differentiable with torch autograd;
    terms that depend on delta directly (e.g. a frequency regulariser) are the caller's to add.
    """
    logits = sliding_window_logits(network, x, patch_size, tile_step_size, use_gaussian, autocast)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        loss = loss_fn(leaf)
        grad_logits, = torch.autograd.grad(loss, leaf)
    grad = sliding_window_vjp(network, x, grad_logits, patch_size, tile_step_size, use_gaussian, autocast)
    return SlidingWindowGrad(loss.detach(), logits, grad)
