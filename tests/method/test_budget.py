"""Budget conversions, the region delta may touch, and the projection."""
import numpy as np
import pytest
import torch

from nnunet_voxshield.config import DEFAULT_EPS
from nnunet_voxshield.method.budget import boundary_band, eps_norm, parse_roi, project, roi_mask, validate_eps
from nnunet_voxshield.errors import VoxShieldError


def test_default_budget_is_0157_zscore_units():
    # the paper's 4/255 of a +-5 sigma window (10 z-score units)
    assert eps_norm(np.array([10.0]), np.array([123.0]), None, None)[0] == pytest.approx(0.15686, abs=1e-5)
    assert DEFAULT_EPS == pytest.approx(4 / 255)


def test_eps_raw_divides_by_the_raw_scale_per_channel():
    e = eps_norm(np.array([10.0, 1.0]), np.array([200.0, 50.0]), None, 20.0)
    np.testing.assert_allclose(e, [0.1, 0.4])
    # and eps (paper unit) times window, times raw_per_norm, is the raw budget
    e = eps_norm(np.array([10.0, 1.0]), np.array([200.0, 50.0]), 8 / 255, None)
    np.testing.assert_allclose(e * np.array([200.0, 50.0]), [8 / 255 * 10 * 200, 8 / 255 * 50])


@pytest.mark.parametrize("eps,eps_raw", [(0.0, None), (-1.0, None), (1.0, None), (None, 0.0), (0.01, 5.0)])
def test_bad_budgets_are_refused(eps, eps_raw):
    with pytest.raises(VoxShieldError):
        validate_eps(eps, eps_raw)


def test_roi_kinds():
    seg = np.zeros((5, 5, 5), int)
    seg[2, 2, 2] = 1
    nonzero = np.ones_like(seg, bool)
    nonzero[0] = False
    assert roi_mask(seg, nonzero, "label").sum() == 1
    assert roi_mask(seg, nonzero, "dilate:1").sum() == 7
    assert roi_mask(seg, nonzero, "all").sum() == nonzero.sum()
    assert not roi_mask(seg, nonzero, "all")[0].any(), "all-zero voxels are never perturbed"
    for bad in ("labels", "dilate:0", "dilate:x", ""):
        with pytest.raises(VoxShieldError):
            parse_roi(bad)


def test_project_clamps_per_channel_and_masks():
    delta = torch.tensor([[[[-5.0, 0.05, 5.0]]], [[[-5.0, 0.05, 5.0]]]])
    mask = torch.tensor([[[True, True, False]]])
    out = project(delta, torch.tensor([0.1, 1.0]), mask)
    np.testing.assert_allclose(out.numpy().ravel(), [-0.1, 0.05, 0.0, -1.0, 0.05, 0.0])


def test_boundary_band_holds_the_voxels_next_to_a_label_change_on_both_sides():
    labels = np.zeros((9, 9, 9), dtype=np.int16)
    labels[2:7, 2:7, 2:7] = 1
    labels[4, 4, 4] = 2  # a one-voxel label inside label 1
    one, two = boundary_band(labels, 1), boundary_band(labels, 2)
    assert one[1, 4, 4] and one[2, 4, 4] and one[7, 4, 4] and one[6, 4, 4]  # either side of a face of the cube
    assert not one[0, 4, 4] and not one[3, 3, 3] and not one[1, 1, 1]  # a diagonal neighbour is not a face neighbour
    assert one[4, 4, 4] and one[3, 4, 4] and one[4, 5, 4]  # the inner label and its 6 neighbours
    assert two[0, 4, 4] and two[3, 3, 4] and not two[0, 0, 0] and (two >= one).all()
    assert not boundary_band(np.ones((4, 4, 4), dtype=np.int16), 1).any()  # one label: no boundary
