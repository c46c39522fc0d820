"""CaseGrid maps exactly between the raw files and nnU-Net's preprocessed arrays (checked against nnU-Net itself)."""

import numpy as np
import pytest
import torch

from nnunet_voxshield.nnunet.bridge import _channel_scales, delta_to_raw, preprocess_case, resampler
from nnunet_voxshield.errors import VoxShieldError
from planning import case_files, load_plans, plan_datasets, read_zyx, to_cropped
from synthetic import make_raw_dataset

TRANSPOSE = (2, 0, 1)
SPACING_XYZ = (1.0, 1.0, 4.0)
TARGET_TRANSPOSED = (1.1, 3.0, 0.9)  # (x, z, y)


@pytest.fixture(scope="module")
def planned(nnunet_module_dirs):
    ds = make_raw_dataset(nnunet_module_dirs["nnUNet_raw"], 881, name="Bridge", n_train=2, n_test=0,
                          shape=(12, 28, 30), spacing_xyz=SPACING_XYZ, channels=("MRI", "CT"),
                          body=True, seed=3)
    plan_datasets(881)
    pm, cm, dj = load_plans(nnunet_module_dirs, ds, transpose_forward=TRANSPOSE,
                            spacing=list(TARGET_TRANSPOSED), use_mask_for_norm=[True, False])
    images, seg = case_files(ds, "bridge_000", 2)
    data_pre, seg_pre, props, grid = preprocess_case(images, seg, pm, cm, dj, "bridge_000")
    return dict(pm=pm, cm=cm, dj=dj, images=images, seg=seg, data_pre=data_pre, props=props, grid=grid)


def test_grid_geometry(planned):
    grid, props = planned["grid"], planned["props"]
    raw = read_zyx(planned["images"])
    assert grid.shape_raw == raw.shape[1:]
    assert grid.transpose_forward == TRANSPOSE and grid.transpose_backward == (1, 2, 0)
    assert grid.shape_before_cropping == tuple(props["shape_before_cropping"])
    assert grid.shape_cropped == to_cropped(raw, grid).shape[1:]
    assert grid.shape_preprocessed == planned["data_pre"].shape[1:]
    assert grid.spacing_cropped == tuple(SPACING_XYZ[::-1][i] for i in TRANSPOSE)  # nnU-Net spacing is (z, y, x)
    assert grid.target_spacing == TARGET_TRANSPOSED
    r = resampler(grid)
    assert r.do_separate_z and r.axis == 1 and not r.is_identity
    assert resampler(grid) is r
    # the crop removed something (body=True) and the mask covers exactly the nonzero body
    assert grid.shape_cropped != grid.shape_before_cropping
    cropped = to_cropped(raw, grid)
    assert grid.nonzero_mask_cropped.shape == grid.shape_cropped
    assert np.all(cropped[:, ~grid.nonzero_mask_cropped] == 0)
    assert np.all(grid.nonzero_mask_cropped[np.any(cropped != 0, axis=0)])
    assert grid.normalization_schemes == ("ZScoreNormalization", "CTNormalization")
    np.testing.assert_array_equal(grid.window, [10.0, 10.0])


def test_scales_reproduce_nnunet_preprocessing(planned):
    """Rebuilding data_pre from the raw files with the grid's scales and the torch resampler matches nnU-Net."""
    grid, pm = planned["grid"], planned["pm"]
    cropped = to_cropped(read_zyx(planned["images"]), grid).astype(np.float32)
    seg_cropped = to_cropped(read_zyx([planned["seg"]]), grid)[0]

    zscore_mask = grid.nonzero_mask_cropped | (seg_cropped > 0)
    z = cropped[0]
    assert grid.raw_per_norm[0] == pytest.approx(float(z[zscore_mask].std()), rel=1e-6)
    norm0 = np.where(zscore_mask, (z - z[zscore_mask].mean()) / grid.raw_per_norm[0], z)
    ct = pm.foreground_intensity_properties_per_channel["1"]
    assert grid.raw_per_norm[1] == pytest.approx(ct["std"])
    norm1 = (np.clip(cropped[1], ct["percentile_00_5"], ct["percentile_99_5"]) - ct["mean"]) / grid.raw_per_norm[1]

    normalised = torch.from_numpy(np.stack([norm0, norm1]).astype(np.float64))
    ours = resampler(grid).like_nnunet(normalised).numpy()
    ref = planned["data_pre"]
    for c in range(2):
        assert np.abs(ours[c] - ref[c]).max() <= 1e-4 * float(np.ptp(ref[c]))


def test_delta_to_raw_round_trip(planned):
    grid = planned["grid"]
    rng = np.random.default_rng(0)
    delta = rng.uniform(-1, 1, (2, *grid.shape_cropped))
    raw = delta_to_raw(delta, grid)
    assert raw.shape == (2, *grid.shape_raw)
    back = to_cropped(raw, grid)
    np.testing.assert_allclose(back / grid.raw_per_norm[:, None, None, None], delta, rtol=1e-12)
    assert np.abs(raw).sum() == pytest.approx(np.abs(back).sum())  # nothing outside the crop box
    with pytest.raises(ValueError):
        delta_to_raw(delta[:1], grid)


def test_unsupported_normalisation_is_a_one_line_error():
    with pytest.raises(VoxShieldError, match="not supported"):
        _channel_scales("MyOwnNormalization", np.zeros((2, 2, 2), np.float32), None, False, None, {})
