"""ZDiv, SPD, the combined VoxShield objective and the choice of slice axis, checked against hand-computed values."""
import math

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.method.objectives import (TargetedObjective, VoxShieldObjective, cyclic_shift, permute_labels,
                                                select_slice_axis, spd, zdiv, zdiv_profile)


def nnunet_seg_loss():
    """The loss nnUNetTrainer._build_loss makes for a label (not region) task."""
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def tiny_network(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def stripes_then_flat(c=0.5, shape=(6, 8, 10)):
    """delta[x, y, z] = c * (-1)^y on even z, c on odd z: every z-slice pair swaps a Nyquist stripe for DC
    (RMS change c*sqrt(2)), while all x-slices are identical."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    d = np.where(z % 2 == 0, c * (-1.0) ** y, c)
    return torch.tensor(d, dtype=torch.float64)


# ---------------------------------------------------------------- zdiv: values

def test_two_constant_slices_differ_by_their_absolute_levels():
    x = torch.stack([torch.full((4, 6), 1.0), torch.full((4, 6), 3.0)], dim=-1)  # [X=4, Y=6, Z=2]
    assert zdiv_profile(x, slice_axis=2).tolist() == pytest.approx([2.0])
    flipped = torch.stack([torch.full((4, 6), 1.0), torch.full((4, 6), -1.0)], dim=-1)
    assert zdiv_profile(flipped, slice_axis=2).tolist() == pytest.approx([0.0], abs=1e-7)  # magnitude ignores sign


def test_identical_slices_give_zero():
    slice_ = torch.randn(1, 1, 7, 9, 1)
    x = slice_.repeat(1, 1, 1, 1, 5)
    assert zdiv_profile(x, 2).shape == (1, 1, 4)
    assert zdiv(x, 2).item() == pytest.approx(0.0, abs=1e-6)


def test_profile_sees_changes_only_along_the_chosen_axis():
    d = stripes_then_flat(c=0.5)
    along_z = zdiv_profile(d, slice_axis=2)
    assert along_z.shape == (9,)
    assert torch.allclose(along_z, torch.full((9,), 0.5 * math.sqrt(2), dtype=torch.float64))
    assert zdiv_profile(d, slice_axis=0).abs().max().item() < 1e-12


def test_leading_dims_are_kept_and_averaged_by_zdiv():
    d = stripes_then_flat(c=1.0)
    batch = torch.stack([d, 2 * d, 0 * d]).reshape(3, 1, *d.shape)
    assert zdiv_profile(batch, 2).shape == (3, 1, 9)
    assert zdiv(batch, 2).item() == pytest.approx(math.sqrt(2) * (1 + 2 + 0) / 3)


def test_zdiv_is_absolutely_homogeneous():
    d = torch.randn(2, 2, 8, 8, 6, dtype=torch.float64)
    for a in (-2.5, 0.3, 4.0):
        assert zdiv(a * d, 2).item() == pytest.approx(abs(a) * zdiv(d, 2).item(), rel=1e-10)


def test_normalisation_keeps_zdiv_on_the_scale_of_delta():
    """Parseval + reverse triangle inequality: each pair's value is at most the RMS of the voxel-wise slice
    difference, hence at most 2 * max|delta|. An unnormalised FFT would exceed this by sqrt(slice size)."""
    eps = 0.157
    d = (torch.rand(2, 1, 16, 16, 12, dtype=torch.float64) * 2 - 1) * eps
    profile = zdiv_profile(d, 2)
    rms_slice_change = (d[..., 1:] - d[..., :-1]).pow(2).mean(dim=(2, 3)).sqrt()
    assert torch.all(profile <= rms_slice_change + 1e-12)
    assert zdiv(d, 2).item() <= 2 * eps
    assert zdiv(d, 2).item() > 0.1 * eps  # and not vanishingly small either


def test_bad_slice_axis_is_rejected():
    with pytest.raises(VoxShieldError):
        zdiv_profile(torch.zeros(4, 4, 4), 3)
    with pytest.raises(ValueError):
        zdiv(torch.zeros(4, 4, 4), 0)  # not [B, C, X, Y, Z]


# ---------------------------------------------------------------- zdiv: gradients

def test_gradient_is_finite_on_all_zero_delta():
    d = torch.zeros(1, 1, 6, 6, 6, requires_grad=True)
    zdiv(d, 2).backward()
    assert torch.isfinite(d.grad).all()


def test_sign_gradient_ascent_step_increases_zdiv():
    torch.manual_seed(1)
    eps, step = 0.157, 0.157 / 4
    d = ((torch.rand(2, 1, 12, 12, 10) * 2 - 1) * eps).requires_grad_(True)
    before = zdiv(d, 2)
    before.backward()
    after = zdiv((d + step * d.grad.sign()).clamp(-eps, eps), 2)
    assert after.item() > before.item() * 1.05


def test_descent_step_on_seg_only_objective_lowers_seg_loss():
    torch.manual_seed(2)
    net = tiny_network()
    objective = VoxShieldObjective(nnunet_seg_loss(), lambda_z=0.0, lambda_s=0.0)
    x = torch.randn(2, 1, 10, 10, 10)
    target = torch.randint(0, 3, (2, 1, 10, 10, 10)).float()
    d = torch.zeros_like(x).uniform_(-0.157, 0.157).requires_grad_(True)
    total, parts = objective(net(x + d), target, d, slice_axis=2)
    total.backward()
    assert total.item() == pytest.approx(parts["seg"])
    d_next = (d - 0.157 / 4 * d.grad.sign()).detach()
    _, parts_next = objective(net(x + d_next), target, d_next, slice_axis=2)
    assert parts_next["seg"] < parts["seg"] - 1e-4


# ---------------------------------------------------------------- spd

def test_spd_value_and_deep_supervision_lists():
    adv = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    clean = torch.tensor([[0.0, 0.0], [0.5, 1.0]])
    assert spd(adv, clean).item() == pytest.approx((1 + 2 + 0 + 1) / 4)
    low_res = torch.full((1, 1), 100.0)
    assert spd([adv, low_res], [clean, torch.zeros(1, 1)]).item() == pytest.approx(1.0)  # first output only


def test_spd_treats_clean_logits_as_constant():
    adv = torch.tensor([2.0, -1.0, 0.0, 3.0], requires_grad=True)
    clean = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    spd(adv * 1.0, clean * 1.0).backward()
    assert clean.grad is None
    assert adv.grad.tolist() == pytest.approx([0.25, -0.25, -0.25, 0.25])


# ---------------------------------------------------------------- the combined objective

def _inputs(seed=3):
    torch.manual_seed(seed)
    net = tiny_network(seed)
    x = torch.randn(2, 1, 8, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    d = torch.zeros_like(x).uniform_(-0.157, 0.157).requires_grad_(True)
    return net, x, target, d


def test_total_combines_the_three_terms_with_their_weights():
    net, x, target, d = _inputs()
    loss = nnunet_seg_loss()
    logits_adv, logits_clean = net(x + d), net(x)
    total, parts = VoxShieldObjective(loss, lambda_z=0.2, lambda_s=0.05)(logits_adv, target, d, 2, logits_clean)
    assert parts["seg"] == pytest.approx(loss(logits_adv, target).item())
    assert parts["zdiv"] == pytest.approx(zdiv(d, 2).item())
    assert parts["spd"] == pytest.approx(spd(logits_adv, logits_clean).item())
    assert total.item() == pytest.approx(parts["seg"] - 0.2 * parts["zdiv"] - 0.05 * parts["spd"], rel=1e-6)


def test_switched_off_terms_are_reported_but_add_no_gradient():
    net, x, target, d = _inputs()
    loss = nnunet_seg_loss()
    logits_adv = net(x + d)
    total, parts = VoxShieldObjective(loss, lambda_z=0.0, lambda_s=0.0)(logits_adv, target, d, 2, net(x))
    assert parts["zdiv"] > 0 and parts["spd"] > 0
    assert total.item() == pytest.approx(parts["seg"])
    grad_total, = torch.autograd.grad(total, d)
    grad_seg, = torch.autograd.grad(loss(net(x + d), target), d)
    assert torch.allclose(grad_total, grad_seg)


def test_spd_is_nan_without_clean_logits():
    net, x, target, d = _inputs()
    total, parts = VoxShieldObjective(nnunet_seg_loss())(net(x + d), target, d, 2)
    assert math.isnan(parts["spd"])
    assert total.item() == pytest.approx(parts["seg"] - 0.2 * parts["zdiv"], rel=1e-6)


def test_objective_accepts_deep_supervision_wrapped_loss():
    net, x, target, d = _inputs()
    loss = DeepSupervisionWrapper(nnunet_seg_loss(), (1.0, 0.0))
    full = net(x + d)
    logits = [full, torch.nn.functional.avg_pool3d(full, 2)]
    targets = [target, target[:, :, ::2, ::2, ::2]]
    total, parts = VoxShieldObjective(loss)(logits, targets, d, 2, [net(x), logits[1].detach()])
    assert parts["seg"] == pytest.approx(nnunet_seg_loss()(full, target).item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(d.grad).all()


def test_negative_weight_is_a_user_error():
    with pytest.raises(VoxShieldError):
        VoxShieldObjective(nnunet_seg_loss(), lambda_z=-0.1)


# ---------------------------------------------------------------- slice axis

def test_anisotropic_spacing_picks_the_largest():
    assert select_slice_axis((1.0, 3.0, 1.0), (0, 1, 2)) == 1
    assert select_slice_axis((5.0, 0.8, 0.8), (0, 1, 2)) == 0


def test_isotropic_spacing_falls_back_to_reader_axis_0():
    assert select_slice_axis((1.0, 1.04, 1.0), (0, 1, 2)) == 0
    assert select_slice_axis((1.0, 1.04, 1.0), (2, 0, 1)) == 1  # reader axis 0 sits at preprocessed axis 1
    assert select_slice_axis((1.0, 1.06, 1.0), (0, 1, 2)) == 1  # just past the tolerance: anisotropic


def test_transpose_forward_maps_reader_axis_to_preprocessed_axis():
    # reader axis 2 has the largest spacing; preprocessed axis i holds reader axis transpose_forward[i]
    assert select_slice_axis((0.7, 0.7, 2.5), (2, 0, 1)) == 0
    assert select_slice_axis((0.7, 0.7, 2.5), (1, 2, 0)) == 1


def test_override_wins_and_is_validated():
    assert select_slice_axis((5.0, 1.0, 1.0), (0, 1, 2), override=2) == 2
    for bad in (3, -1, 1.0, True, "z"):
        with pytest.raises(VoxShieldError):
            select_slice_axis((5.0, 1.0, 1.0), (0, 1, 2), override=bad)


# ---------------------------------------------------------------- targeted poisoning

def test_the_attacks_labels_move_every_label_keep_the_region_outside_and_the_dtype():
    reference = torch.tensor([[-1, 0, 1], [2, 3, 3]], dtype=torch.int16)
    target = permute_labels(reference, cyclic_shift(3))
    assert target.dtype == torch.int16
    np.testing.assert_array_equal(target.numpy(), [[-1, 0, 2], [3, 1, 1]])


def test_targeted_objective_is_the_segmentation_loss_toward_the_permuted_labels():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 5, 6, 7), torch.randint(0, 4, (2, 1, 5, 6, 7)).float()
    loss, terms = TargetedObjective(nnunet_seg_loss(), cyclic_shift(3))(logits, labels, torch.zeros(1), 2)
    assert loss.item() == pytest.approx(nnunet_seg_loss()(logits, permute_labels(labels, cyclic_shift(3))).item())
    assert loss.item() != pytest.approx(nnunet_seg_loss()(logits, labels).item())
    assert math.isnan(terms["zdiv"]) and math.isnan(terms["spd"])
