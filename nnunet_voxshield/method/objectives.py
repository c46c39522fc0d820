"""The VoxShield objective: error-minimising segmentation loss, inter-slice frequency disruption (ZDiv) and
semantic prediction disruption (SPD).

    total = SegLoss(f(x + delta), y) - lambda_z * ZDiv(delta) - lambda_s * mean|f(x + delta) - f(x)|

ZDiv is normalised (orthonormal FFT, RMS over frequencies) so that it has the size of delta itself, at most
twice its largest value: a first prototype with an unnormalised FFT let ZDiv (30-50) drown the Dice+CE term
(about 1) and delta stopped minimising any error.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from nnunet_voxshield.config import LAMBDA_S, LAMBDA_Z
from nnunet_voxshield.errors import VoxShieldError

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]

ISOTROPY_TOLERANCE = 1.05
"""Spacings whose max/min ratio is below this count as isotropic: the slice axis is then the file's own
slice axis (reader axis 0, SimpleITK's z) instead of a rounding accident of the largest spacing."""


def check_slice_axis(axis, what: str = "slice axis") -> int:
    """The one check of a slice axis, for flags and callers alike: a spatial index 0, 1 or 2."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis <= 2:
        raise VoxShieldError(f"{what} {axis!r} is not a spatial axis: pass 0, 1 or 2 (preprocessed axis order)")
    return axis


def zdiv_profile(x: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """Per adjacent slice pair along `slice_axis` (a spatial index 0..2 of the last three dims), the RMS over
    in-plane frequencies of the difference of the two slices' orthonormal 2D FFT magnitudes.

    Returns a tensor of shape (*leading dims, n_slices - 1). The magnitude ignores a slice's sign and
    in-plane position, so the profile measures how much the in-plane frequency content changes from slice to
    slice. torch.abs on a complex zero has gradient 0, so all-zero regions (outside the ROI) are safe."""
    check_slice_axis(slice_axis)
    if x.ndim < 3:
        raise ValueError(f"zdiv_profile needs at least 3 (spatial) dims, got shape {tuple(x.shape)}")
    slices_first = torch.movedim(x, x.ndim - 3 + slice_axis, -3)
    if slices_first.shape[-3] < 2:
        raise ValueError(f"need at least 2 slices along axis {slice_axis}, got shape {tuple(x.shape)}")
    magnitudes = torch.fft.fft2(slices_first, norm="ortho").abs()
    change = magnitudes[..., 1:, :, :] - magnitudes[..., :-1, :, :]
    n_frequencies = change.shape[-1] * change.shape[-2]
    return torch.linalg.vector_norm(change, dim=(-2, -1)) / math.sqrt(n_frequencies)


def zdiv(delta: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """Inter-slice frequency disruption of a perturbation batch [B, C, X, Y, Z]: the mean of `zdiv_profile`
    over slice pairs, channels and batch. VoxShield maximises it."""
    if delta.ndim != 5:
        raise ValueError(f"zdiv expects delta of shape [B, C, X, Y, Z], got {tuple(delta.shape)}")
    return zdiv_profile(delta, slice_axis).mean()


def _full_resolution(logits: Logits) -> torch.Tensor:
    """nnU-Net's deep supervision returns a list, highest resolution first."""
    return logits[0] if isinstance(logits, (list, tuple)) else logits


def spd(logits_adv: Logits, logits_clean: Logits) -> torch.Tensor:
    """Semantic prediction disruption: mean |f(x + delta) - f(x)| over the full-resolution logits.
    The clean logits are a fixed reference, so no gradient flows into them. VoxShield maximises it."""
    adv = _full_resolution(logits_adv)
    clean = _full_resolution(logits_clean).detach()
    if adv.shape != clean.shape:
        raise ValueError(f"logit shapes differ: {tuple(adv.shape)} vs {tuple(clean.shape)}")
    return (adv - clean).abs().mean()


class VoxShieldObjective:
    """total = seg - lambda_z * zdiv - lambda_s * spd, minimised over delta (and over the surrogate's weights).

    `seg_loss` is the loss object the nnU-Net trainer built (DC_and_CE_loss, usually inside a
    DeepSupervisionWrapper); logits and target are passed to it unchanged, in whatever form it expects."""

    def __init__(self, seg_loss, lambda_z: float = LAMBDA_Z, lambda_s: float = LAMBDA_S):
        if lambda_z < 0 or lambda_s < 0:
            raise VoxShieldError(f"lambda_z and lambda_s must be >= 0 (got {lambda_z}, {lambda_s}); "
                                 "use 0 to switch a term off")
        self.seg_loss = seg_loss
        self.lambda_z = float(lambda_z)
        self.lambda_s = float(lambda_s)

    def __call__(self, logits_adv: Logits, target, delta: torch.Tensor, slice_axis: int,
                 logits_clean: Optional[Logits] = None) -> Tuple[torch.Tensor, dict]:
        """Returns (total, {"seg", "zdiv", "spd"} as floats). spd is NaN when no clean logits are given;
        a term whose weight is 0 is still reported but adds no graph."""
        seg = self.seg_loss(logits_adv, target)
        total = seg
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_z > 0):
            z = zdiv(delta, slice_axis)
        if self.lambda_z > 0:
            total = total - self.lambda_z * z
        s_value = float("nan")
        if logits_clean is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_s > 0):
                s = spd(logits_adv, logits_clean)
            if self.lambda_s > 0:
                total = total - self.lambda_s * s
            s_value = s.item()
        return total, {"seg": seg.item(), "zdiv": z.item(), "spd": s_value}


def select_slice_axis(spacing_reader_order: Sequence[float], transpose_forward: Sequence[int],
                      override: Optional[int] = None) -> int:
    """The through-plane axis, as an index into the preprocessed (transposed) spatial axes.

    Rule: the reader-order axis with the largest spacing (the first one on ties); if the spacing is isotropic
    (max/min < ISOTROPY_TOLERANCE) the file's own slice axis, which for nnU-Net's SimpleITK readers is reader
    axis 0. Preprocessed axis i holds reader axis transpose_forward[i]. `override` is a preprocessed-order axis
    chosen by the user and wins when given."""
    if override is not None:
        return check_slice_axis(override)
    spacing = [float(s) for s in spacing_reader_order]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"expected 3 positive spacings, got {spacing_reader_order!r}")
    if sorted(int(a) for a in transpose_forward) != [0, 1, 2]:
        raise ValueError(f"transpose_forward must be a permutation of (0, 1, 2), got {transpose_forward!r}")
    if max(spacing) / min(spacing) < ISOTROPY_TOLERANCE:
        reader_axis = 0
    else:
        reader_axis = spacing.index(max(spacing))
    return [int(a) for a in transpose_forward].index(reader_axis)


class TargetedObjective:
    """Adversarial poisoning (Fowl et al., NeurIPS 2021): minimise the segmentation loss toward a fixed permutation of
    the labels, so the perturbation carries the features a clean-trained network reads as the *other* label. A victim
    trained on it learns those features for the true label and misreads clean scans.

    `permutation[k]` is the target of label k (background maps to itself by default)."""

    def __init__(self, seg_loss, permutation):
        self.seg_loss = seg_loss
        self.permutation = list(permutation)
        self.lambda_s = 0.0  # the loop needs no clean logits

    def __call__(self, logits_adv: Logits, target, delta: torch.Tensor, slice_axis: int,
                 logits_clean: Optional[Logits] = None) -> Tuple[torch.Tensor, dict]:
        seg = self.seg_loss(logits_adv, permute_labels(target, self.permutation))
        return seg, {"seg": seg.item(), "zdiv": float("nan"), "spd": float("nan")}


def permute_labels(target: torch.Tensor, permutation) -> torch.Tensor:
    """The label map a targeted attack aims at: each label k replaced by permutation[k], in target's dtype; negative
    values (nnU-Net's -1 outside the nonzero region) kept."""
    lut = torch.as_tensor(list(permutation), dtype=torch.long, device=target.device)
    return torch.where(target >= 0, lut[target.long().clamp(min=0)].to(target.dtype), target)


def cyclic_shift(n_foreground: int) -> list[int]:
    """Label permutation 0 -> 0, k -> k + 1 (the last foreground label -> 1): every structure becomes another."""
    return [0, *[(k % n_foreground) + 1 for k in range(1, n_foreground + 1)]]
