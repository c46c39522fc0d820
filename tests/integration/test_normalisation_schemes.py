"""Every nnU-Net normalisation scheme: protect a tiny dataset and pass check, survival included.

CT is the hard one: nnU-Net clips CT to the foreground's 0.5-99.5 percentile window before the z-score, so a
perturbation on air or bone would be erased. VoxShield keeps delta inside the window, and refuses to release a
dataset whose perturbation does not survive.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_voxshield.cli import check as check_cli
from nnunet_voxshield.cli import protect as protect_cli
from nnunet_voxshield.nnunet import bridge
from nnunet_voxshield.nnunet.env import plan_and_preprocess
from synthetic import make_raw_dataset, tree_hash

pytestmark = pytest.mark.slow  # real nnU-Net planning and preprocessing

FAST = ["-device", "cpu", "--rounds", "1", "--surrogate-iters", "1", "--probe-every", "0"]
CT, MULTI, MASKED = 981, 982, 983


@pytest.fixture(scope="module")
def planned(nnunet_module_dirs):
    raw = nnunet_module_dirs["nnUNet_raw"]
    # int16 chest-like CT, thick slices of varying spacing (so nnU-Net resamples), air and bone outside the window
    make_raw_dataset(raw, CT, name="Chest", n_train=3, n_test=0, shape=(12, 40, 40), spacing_xyz=(0.8, 0.8, 4.0),
                     channels=("CTAir",), dtype=np.int16, body=True, body_radius=0.9, vary_spacing=True)
    # z-score without the nonzero mask, no normalisation, rescale to 0-1 and RGB, one channel each
    make_raw_dataset(raw, MULTI, name="Schemes", n_train=3, n_test=0, shape=(16, 24, 24),
                     channels=("T1", "noNorm", "rescale_to_0_1", "rgb_to_0_1"))
    # z-score inside the nonzero mask (a small body, so nnU-Net plans use_mask_for_norm)
    make_raw_dataset(raw, MASKED, name="Masked", n_train=3, n_test=0, shape=(20, 24, 24), body=True,
                     body_radius=0.75)
    for dataset in (CT, MULTI, MASKED):
        plan_and_preprocess(dataset)
    return nnunet_module_dirs


def _plans(dirs, name) -> dict:
    return json.loads((dirs["nnUNet_preprocessed"] / name / "nnUNetPlans.json").read_text())["configurations"][
        "3d_fullres"]


def _report(dirs, dataset_id) -> dict:
    return json.loads((next(dirs["nnUNet_raw"].glob(f"Dataset{dataset_id}_*")) / "voxshield.json").read_text())


def _written_masked_cases(dirs, dataset_id):
    """(source image, written image - source, labels) of each training case of the masked set, as written by protect
    into Dataset<dataset_id>_MaskedVoxShield."""
    raw = dirs["nnUNet_raw"]
    read = lambda folder, sub: sitk.GetArrayFromImage(sitk.ReadImage(str(raw / folder / sub)))
    for case in ("masked_000", "masked_001", "masked_002"):
        source = read(f"Dataset{MASKED}_Masked", f"imagesTr/{case}_0000.nii.gz")
        delta = read(f"Dataset{dataset_id}_MaskedVoxShield", f"imagesTr/{case}_0000.nii.gz") - source
        yield source, delta, read(f"Dataset{MASKED}_Masked", f"labelsTr/{case}.nii.gz")


def test_ct_with_roi_all_survives_the_clip_window(planned):
    plans = _plans(planned, f"Dataset{CT}_Chest")
    assert plans["normalization_schemes"] == ["CTNormalization"]
    assert protect_cli.main(["-d", str(CT), "-o", "781", *FAST, "--roi", "all"]) == 0
    assert check_cli.main(["-d", str(CT), "-pd", "781", "--min-survival", "0.95"]) == 0
    report = _report(planned, 781)
    assert report["summary"]["min_survival_corr"] >= 0.95
    assert report["summary"]["max_budget_fraction"] <= 1


def test_ct_release_that_would_not_survive_is_refused(planned, monkeypatch, capsys):
    """Without the clip window (what VoxShield did before), air and bone erase the perturbation: protect must exit
    non-zero with one line naming the cases, release nothing, and release only when told to accept it."""
    monkeypatch.setattr(bridge, "_headroom", lambda *args: None)
    with pytest.raises(SystemExit) as e:
        protect_cli.main(["-d", str(CT), "-o", "782", *FAST, "--roi", "all", "--seed", "3"])
    assert e.value.code == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("voxshield:")]
    assert "error: survival below 0.9" in err and "--accept-low-survival" in err
    assert not list(planned["nnUNet_raw"].glob("Dataset782_*"))
    assert protect_cli.main(["-d", str(CT), "-o", "782", *FAST, "--roi", "all", "--seed", "3",
                             "--accept-low-survival"]) == 0
    assert "warning: releasing" in capsys.readouterr().out
    assert _report(planned, 782)["survival_accepted_below"]
    assert check_cli.main(["-d", str(CT), "-pd", "782"]) == 1  # and check still says the truth


def test_zscore_nonorm_rescale_and_rgb(planned):
    plans = _plans(planned, f"Dataset{MULTI}_Schemes")
    assert plans["normalization_schemes"] == ["ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                                              "RGBTo01Normalization"]
    assert not any(plans["use_mask_for_norm"])
    assert protect_cli.main(["-d", str(MULTI), "-o", "783", *FAST, "--roi", "all"]) == 0
    assert check_cli.main(["-d", str(MULTI), "-pd", "783"]) == 0
    assert _report(planned, 783)["summary"]["min_survival_corr"] >= 0.95


def test_zscore_with_the_nonzero_mask(planned):
    plans = _plans(planned, f"Dataset{MASKED}_Masked")
    assert plans["normalization_schemes"] == ["ZScoreNormalization"] and plans["use_mask_for_norm"] == [True]
    assert protect_cli.main(["-d", str(MASKED), "-o", "784", *FAST, "--roi", "dilate:2"]) == 0
    assert check_cli.main(["-d", str(MASKED), "-pd", "784"]) == 0


def test_absence_codes_the_brain_around_the_labels_and_leaves_the_labels_untouched(planned):
    """--method absence --roi all on a masked z-score set (a skull-stripped brain's layout): in the written files the
    grating is on most background voxels inside the body, on no labelled voxel and on nothing outside the body (the
    nonzero mask nnU-Net crops and normalises with stays as it was); check passes; the same seed writes the same
    files."""
    command = ["-d", str(MASKED), "-o", "785", *FAST, "--method", "absence", "--roi", "all", "--eps", "8/255"]
    assert protect_cli.main(command) == 0
    assert check_cli.main(["-d", str(MASKED), "-pd", "785"]) == 0
    for source, delta, labels in _written_masked_cases(planned, 785):
        assert not delta[labels > 0].any() and not delta[source == 0].any()
        background = (labels == 0) & (source != 0)
        assert (delta[background] != 0).mean() > 0.8
        assert (delta[background] > 0).mean() == pytest.approx(0.5, abs=0.15)  # a square wave: both signs
    written = planned["nnUNet_raw"] / "Dataset785_MaskedVoxShield" / "imagesTr"
    before = tree_hash(written)
    assert protect_cli.main([*command, "--overwrite"]) == 0
    assert tree_hash(written) == before


def test_rim_codes_the_labels_and_a_background_rim_and_nothing_beyond(planned):
    """--method rim --roi dilate:2: in the written files the labels and a rim of background two voxels deep carry the
    code (most voxels moved, both signs), nothing beyond the rim moves; check passes."""
    from scipy.ndimage import binary_dilation
    assert protect_cli.main(["-d", str(MASKED), "-o", "786", *FAST, "--method", "rim", "--roi", "dilate:2",
                             "--eps", "8/255"]) == 0
    assert check_cli.main(["-d", str(MASKED), "-pd", "786"]) == 0
    for source, delta, labels in _written_masked_cases(planned, 786):
        grown = binary_dilation(labels > 0, iterations=2)
        assert not delta[~grown].any()
        for region in (labels > 0, grown & (labels == 0) & (source != 0)):
            assert (delta[region] != 0).mean() > 0.8
            assert (delta[region] > 0).mean() == pytest.approx(0.5, abs=0.15)
