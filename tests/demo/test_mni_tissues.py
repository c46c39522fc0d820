"""The demo dataset: valid nnU-Net raw data with real brain anatomy, deterministic, written atomically, offline."""
import json
import socket

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_voxshield.demo import mni_tissues as demo_data
from nnunet_voxshield.errors import VoxShieldError
from failed_builds import assert_failed_build_keeps_old_copy

N_TRAIN, N_TEST = 3, 1
SHAPE_ZYX = (43, 50, 42)  # 172 x 200 x 168 mm field of view at 4 mm


def _no_network(*args, **kwargs):
    raise AssertionError("the demo dataset must not touch the network")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small build with every socket call failing and every template cache cleared, so loading is real."""
    from nilearn import datasets
    for loader in (datasets.load_mni152_template, datasets.load_mni152_gm_template,
                   datasets.load_mni152_wm_template):
        getattr(loader, "cache_clear", lambda: None)()  # some nilearn loaders are lru-cached
    with pytest.MonkeyPatch.context() as mp:
        for attr in ("connect", "connect_ex"):
            mp.setattr(socket.socket, attr, _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        return demo_data.build_demo_dataset(tmp_path_factory.mktemp("raw"), n_train=N_TRAIN, n_test=N_TEST)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _cases(root):
    return sorted(p.name[:-len(".nii.gz")] for p in (root / "labelsTr").glob("*.nii.gz")) + \
        sorted(p.name[:-len(".nii.gz")] for p in (root / "labelsTs").glob("*.nii.gz"))


def _pairs(root):
    """(image, label) arrays of every case, training then test."""
    out = []
    for split in ("Tr", "Ts"):
        for label_file in sorted((root / f"labels{split}").glob("*.nii.gz")):
            case = label_file.name[:-len(".nii.gz")]
            out.append((_read(root / f"images{split}" / f"{case}_0000.nii.gz"), _read(label_file)))
    return out


def test_layout_and_dataset_json(built):
    assert built.name == "Dataset501_MNIBrain"
    assert _cases(built) == [f"mnibrain_{i:03d}" for i in range(N_TRAIN + N_TEST)]
    assert len(list((built / "imagesTr").iterdir())) == N_TRAIN
    assert len(list((built / "imagesTs").iterdir())) == N_TEST
    meta = json.loads((built / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    assert meta["numTraining"] == N_TRAIN and meta["file_ending"] == ".nii.gz"
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no staging folder left behind


def test_nnunet_accepts_the_dataset(built):
    verify_dataset_integrity(str(built), num_processes=1)  # raises on any problem


def test_geometry_and_types(built):
    image = sitk.ReadImage(str(built / "imagesTr" / "mnibrain_000_0000.nii.gz"))
    label = sitk.ReadImage(str(built / "labelsTr" / "mnibrain_000.nii.gz"))
    assert image.GetSpacing() == (4.0, 4.0, 4.0)
    assert sitk.GetArrayViewFromImage(image).shape == SHAPE_ZYX
    assert image.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
    assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()


def test_every_case_has_all_tissues_in_plausible_amounts(built):
    for image, label in _pairs(built):
        assert set(np.unique(label)) == {0, 1, 2, 3}
        brain = label > 0
        assert 0.2 < brain.mean() < 0.5
        csf, gm, wm = ((label == k).sum() / brain.sum() for k in (1, 2, 3))
        assert 0.05 < csf < 0.2 and 0.45 < gm < 0.7 and 0.2 < wm < 0.45
        # skull-stripped: the image is nonzero exactly on the brain, so nnU-Net's crop follows the brain
        assert np.array_equal(image != 0, brain)


def test_t1_contrast_is_real_anatomy(built):
    """T1 order CSF < GM < WM inside every case, with clear gaps (a random texture would not give this)."""
    for image, label in _pairs(built):
        csf, gm, wm = (np.median(image[label == k]) for k in (1, 2, 3))
        assert csf < 0.85 * gm and gm < 0.9 * wm


def test_cases_differ(built):
    labels = [label for _, label in _pairs(built)]
    for a, b in zip(labels, labels[1:]):
        assert (a != b).mean() > 0.05


def test_same_seed_same_cases_other_seed_other_cases(built, tmp_path):
    again = demo_data.build_demo_dataset(tmp_path / "same", n_train=2, n_test=0)
    other = demo_data.build_demo_dataset(tmp_path / "other", n_train=2, n_test=0, seed=1)
    for i in range(2):
        rel = f"imagesTr/mnibrain_{i:03d}_0000.nii.gz"
        assert np.array_equal(_read(built / rel), _read(again / rel))
        assert not np.allclose(_read(built / rel), _read(other / rel))


def test_spacing_sets_grid_size(tmp_path):
    root = demo_data.build_demo_dataset(tmp_path, n_train=1, n_test=0, spacing_mm=8.0)
    image = sitk.ReadImage(str(root / "imagesTr" / "mnibrain_000_0000.nii.gz"))
    assert image.GetSpacing() == (8.0, 8.0, 8.0)
    assert image.GetSize() == (21, 25, 22)  # x, y, z


def test_existing_dataset_needs_overwrite(tmp_path):
    root = demo_data.build_demo_dataset(tmp_path, n_train=1, n_test=0)
    before = _read(root / "imagesTr" / "mnibrain_000_0000.nii.gz")
    with pytest.raises(VoxShieldError, match="overwrite"):
        demo_data.build_demo_dataset(tmp_path, n_train=1, n_test=0, seed=5)
    assert np.array_equal(before, _read(root / "imagesTr" / "mnibrain_000_0000.nii.gz"))
    demo_data.build_demo_dataset(tmp_path, n_train=2, n_test=0, seed=5, overwrite=True)
    assert not np.allclose(before, _read(root / "imagesTr" / "mnibrain_000_0000.nii.gz"))
    assert len(list((root / "imagesTr").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_failed_build_leaves_nothing_and_keeps_old_copy(tmp_path, monkeypatch):
    assert_failed_build_keeps_old_copy(demo_data.build_demo_dataset, tmp_path, monkeypatch, "mnibrain_000_0000.nii.gz", other_id=502)


def test_id_used_by_another_dataset_is_refused(tmp_path):
    (tmp_path / "Dataset501_Other").mkdir()
    with pytest.raises(VoxShieldError, match="Dataset501_Other"):
        demo_data.build_demo_dataset(tmp_path, n_train=1, n_test=0)


@pytest.mark.parametrize("kwargs", [dict(dataset_id=0), dict(dataset_id=1000), dict(name="My Brain"),
                                    dict(n_train=0), dict(n_test=-1), dict(spacing_mm=0.5)])
def test_bad_arguments_get_one_line_errors(tmp_path, kwargs):
    with pytest.raises(VoxShieldError) as err:
        demo_data.build_demo_dataset(tmp_path, **kwargs)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())
