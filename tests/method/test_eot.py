"""EOTAugment: shapes, identity, gradients, data/seg consistency, reproducibility, and agreement with the
batchgeneratorsv2 transforms that stock nnU-Net training uses."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.spatial import (_convert_my_grid_to_grid_sample_grid,
                                                          _create_centered_identity_grid2, create_affine_matrix_3d)

from nnunet_voxshield.method.eot import (DEFAULT_PROBABILITIES, EOTAugment, _affine_matrices, _contrast_rows,
                                  _gamma_rows, _gaussian_blur_rows, _grid_sample_theta, _low_resolution_rows)
from nnunet_voxshield.errors import VoxShieldError

ROTATION_3D = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)  # nnU-Net's 3D range without dummy 2D
INTENSITY_KEYS = ("noise", "blur", "brightness", "contrast", "lowres", "gamma_inverted", "gamma")
SPATIAL_KEYS = ("rotation", "scaling", "mirror")


def only(*keys, p=1.0):
    return {k: (p if k in keys else 0.0) for k in DEFAULT_PROBABILITIES}


def batch(shape=(8, 1, 12, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(shape, generator=g) + 3.0  # positive offset: gamma and contrast have a range to act on
    seg = torch.randint(0, 3, (shape[0], 1, *shape[2:]), generator=g)
    return data, seg


def test_output_shapes_and_dtypes():
    data, seg = batch((2, 2, 12, 16, 14))
    out, out_seg = EOTAugment(ROTATION_3D, (0, 1, 2), False, strength=5, generator=0)(data, seg)
    assert out.shape == data.shape and out.dtype == data.dtype
    assert out_seg.shape == seg.shape and out_seg.dtype == seg.dtype
    out, out_seg = EOTAugment((-math.pi, math.pi), (0, 1, 2), True, strength=5, generator=0)(data, seg)
    assert out.shape == data.shape
    data2d, seg2d = batch((2, 3, 16, 20))
    out, out_seg = EOTAugment((-math.pi, math.pi), (0, 1), False, strength=5, generator=0)(data2d, seg2d)
    assert out.shape == data2d.shape and out_seg.shape == seg2d.shape
    out, out_seg = EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=0)(data, seg, patch_size=(8, 10, 9))
    assert out.shape == (2, 2, 8, 10, 9) and out_seg.shape == (2, 1, 8, 10, 9)


@pytest.mark.parametrize("kwargs", [{"strength": 0.0}, {"probabilities": only()}])
def test_identity_when_every_probability_is_zero(kwargs):
    data, seg = batch()
    out, out_seg = EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=0, **kwargs)(data, seg)
    assert torch.equal(out, data) and torch.equal(out_seg, seg)


def test_patch_size_without_transforms_is_the_centre_crop():
    data, seg = batch((1, 1, 12, 12, 12))
    out, out_seg = EOTAugment(ROTATION_3D, (0, 1, 2), False, strength=0, generator=0)(data, seg, (8, 6, 12))
    assert torch.equal(out, data[:, :, 2:10, 3:9, :]) and torch.equal(out_seg, seg[:, :, 2:10, 3:9, :])


@pytest.mark.parametrize("key", INTENSITY_KEYS + SPATIAL_KEYS)
def test_each_forced_transform_changes_data_and_passes_gradient(key):
    data, seg = batch()
    data.requires_grad_(True)
    out, _ = EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=1, probabilities=only(key))(data, seg)
    assert not torch.allclose(out, data.detach())
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    assert torch.isfinite(data.grad).all()
    assert data.grad.abs().sum() > 0


def test_hard_draws_force_noise_blur_and_low_resolution_on_every_channel(monkeypatch):
    from nnunet_voxshield.method import eot
    calls = []

    def counted(name):
        def identity(rows, *args):  # counts the rows a transform gets and leaves them, so only the noise remains
            calls.append((name, len(rows)))
            return rows
        return identity

    for name in ("_gaussian_blur_rows", "_low_resolution_rows"):
        monkeypatch.setattr(eot, name, counted(name))
    data, seg = batch(shape=(4, 2, 8, 8, 8))
    make = lambda hard: EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=0, probabilities=only(), hard=hard)
    assert torch.equal(make(0.0)(data, seg)[0], data) and calls == []
    out, out_seg = make(1.0)(data, seg)
    assert calls == [("_gaussian_blur_rows", 8), ("_low_resolution_rows", 8)]  # 4 samples x 2 channels
    assert (out != data).flatten(1).all(1).all() and torch.equal(out_seg, seg)  # noise on every sample


def test_hard_share_is_drawn_per_sample():
    data, seg = batch(shape=(200, 1, 4, 4, 4))
    out, _ = EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=3, probabilities=only(), hard=0.3)(data, seg)
    changed = int((out != data).flatten(1).any(1).sum())
    assert 40 <= changed <= 80  # 60 expected; binomial sd 6.5


def test_gradient_is_finite_with_everything_on_and_dummy_2d():
    data, seg = batch((4, 2, 8, 16, 16))
    data.requires_grad_(True)
    out, _ = EOTAugment((-math.pi, math.pi), (0, 1, 2), True, generator=2, probabilities=only(
        *INTENSITY_KEYS, *SPATIAL_KEYS))(data, seg)
    out.pow(2).sum().backward()
    assert torch.isfinite(data.grad).all() and data.grad.abs().sum() > 0


def test_mirroring_moves_data_and_seg_together():
    _, seg = batch((8, 1, 10, 12, 14))
    data = seg.float() * 10 + torch.arange(14).float()  # data determined by seg and position
    out, out_seg = EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=3, probabilities=only("mirror", p=0.5))(
        data, seg)
    assert not torch.equal(out_seg, seg)
    for b in range(8):
        flipped_z = out_seg[b].float() * 10 + torch.arange(14).float().flip(0)
        assert torch.equal(out[b], out_seg[b].float() * 10 + torch.arange(14).float()) or \
               torch.equal(out[b], flipped_z)


def test_rotation_and_scaling_move_data_and_seg_together():
    seg = torch.zeros(4, 1, 16, 16, 16, dtype=torch.int64)
    seg[:, :, 4:12, 6:14, 3:9] = 1
    seg[:, :, 7:10, 8:11, 4:7] = 2
    data = seg.float()
    out, out_seg = EOTAugment(ROTATION_3D, (), False, generator=4, probabilities=only("rotation", "scaling"))(
        data, seg)
    assert not torch.equal(out_seg, seg)
    assert set(out_seg.unique().tolist()) <= {0, 1, 2}
    agreement = (out.round().long() == out_seg).float().mean().item()
    assert agreement > 0.93  # bilinear data vs nearest labels differ only along edges


def test_intensity_transforms_leave_seg_untouched():
    data, seg = batch()
    out, out_seg = EOTAugment(ROTATION_3D, (0, 1, 2), False, generator=5, probabilities=only(*INTENSITY_KEYS))(
        data, seg)
    assert not torch.allclose(out, data)
    assert torch.equal(out_seg, seg)


def test_same_seed_same_result_other_seed_other_result():
    data, seg = batch()
    run = lambda seed: EOTAugment(ROTATION_3D, (0, 1, 2), False, strength=4, generator=seed)(data, seg)
    (a, sa), (b, sb), (c, _) = run(7), run(7), run(8)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    d, sd = EOTAugment(ROTATION_3D, (0, 1, 2), False, strength=4, generator=g)(data, seg)
    assert torch.equal(a, d) and torch.equal(sa, sd)


def test_strength_scales_and_overrides_replace_probabilities():
    aug = EOTAugment(ROTATION_3D, (0, 1, 2), False, strength=2.0, probabilities={"gamma": 0.05})
    assert aug.probabilities["rotation"] == pytest.approx(0.4)
    assert aug.probabilities["mirror"] == 1.0  # capped
    assert aug.probabilities["gamma"] == 0.05
    assert EOTAugment(ROTATION_3D, (0, 1, 2), False).probabilities == DEFAULT_PROBABILITIES


@pytest.mark.parametrize("kwargs", [{"strength": -1}, {"probabilities": {"elastic": 0.5}},
                                    {"probabilities": {"blur": 1.5}}, {"hard": -0.1}, {"hard": 1.5}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(VoxShieldError):
        EOTAugment(ROTATION_3D, (0, 1, 2), False, **kwargs)


# ---------------------------------------------------------------- agreement with batchgeneratorsv2

def test_spatial_grid_matches_batchgenerators_geometry():
    in_size, out_size = (20, 18, 16), (12, 14, 10)
    angles, scale = [0.3, -0.2, 0.45], 1.2
    affine = create_affine_matrix_3d(angles, [scale] * 3)
    reference = _create_centered_identity_grid2(out_size) @ torch.from_numpy(affine.T).float()
    reference = _convert_my_grid_to_grid_sample_grid(reference, in_size)
    matrices = _affine_matrices(torch.tensor([angles], dtype=torch.float64), torch.tensor([scale], dtype=torch.float64),
                                3, False)
    assert np.allclose(matrices[0].numpy(), affine)
    ours = F.affine_grid(_grid_sample_theta(matrices, in_size, out_size).float(), [1, 1, *out_size],
                         align_corners=False)[0]
    assert torch.allclose(ours, reference, atol=1e-5)


def _reference(transform, rows):
    return transform(image=rows.clone())["image"]


@pytest.mark.parametrize("factor", [0.8, 1.25])  # 1.25 pushes values past the range: the clip matters
def test_contrast_matches_batchgenerators(factor):
    rows = torch.randn(2, 6, 7, 8)
    ref = _reference(ContrastTransform(factor, preserve_range=True, synchronize_channels=False), rows)
    assert torch.allclose(_contrast_rows(rows, torch.tensor([factor, factor])), ref, atol=1e-6)


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_matches_batchgenerators(invert):
    rows = torch.randn(2, 6, 7, 8)
    ref = _reference(GammaTransform(1.3, p_invert_image=float(invert), synchronize_channels=False,
                                    p_per_channel=1, p_retain_stats=1), rows)
    assert torch.allclose(_gamma_rows(rows, torch.tensor([1.3, 1.3]), invert), ref, atol=1e-4)


def test_low_resolution_matches_batchgenerators():
    rows = torch.randn(2, 10, 12, 9)
    ref = _reference(SimulateLowResolutionTransform(0.6, synchronize_channels=False, synchronize_axes=True,
                                                    ignore_axes=None), rows)
    assert torch.allclose(_low_resolution_rows(rows, torch.tensor([0.6, 0.6]), ()), ref, atol=1e-6)
    kept = _low_resolution_rows(rows, torch.tensor([0.6, 0.6]), (0,))
    ref = _reference(SimulateLowResolutionTransform(0.6, synchronize_channels=False, synchronize_axes=True,
                                                    ignore_axes=(0,)), rows)
    assert torch.allclose(kept, ref, atol=1e-6)


def test_blur_matches_batchgenerators():
    rows = torch.randn(2, 10, 12, 9)
    ref = _reference(GaussianBlurTransform(0.7, synchronize_channels=False, synchronize_axes=False,
                                           p_per_channel=1), rows)
    ours = _gaussian_blur_rows(rows, torch.full((2, 3), 0.7))
    assert torch.allclose(ours, ref, atol=2e-3)
    assert not torch.allclose(ours, rows, atol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result_for_the_same_seed():
    data, seg = batch((4, 2, 16, 16, 16))
    make = lambda: EOTAugment(ROTATION_3D, (0, 1, 2), False, strength=4, generator=11)
    cpu, cpu_seg = make()(data, seg)
    gpu_data = data.cuda().requires_grad_(True)
    gpu, gpu_seg = make()(gpu_data, seg.cuda())
    gpu.sum().backward()
    assert gpu.device.type == "cuda" and torch.isfinite(gpu_data.grad).all()
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    assert (gpu_seg.cpu() == cpu_seg).float().mean() > 0.999  # nearest sampling may flip exact ties
