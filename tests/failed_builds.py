"""The failed-build check that every demo dataset builder must pass (they share `demo.builder`)."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_voxshield.demo import builder


def assert_failed_build_keeps_old_copy(build, tmp_path, monkeypatch, first_image: str, other_id: int) -> None:
    """A write that fails mid-build leaves the previous copy in place, and a failed first build leaves nothing."""
    root = build(tmp_path, n_train=1, n_test=0)
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / first_image)))
    calls = []

    def failing_write(*args):
        calls.append(args)
        if len(calls) > 2:
            raise OSError("disk full")
        return original(*args)

    original = builder.write_nifti
    monkeypatch.setattr(builder, "write_nifti", failing_write)
    with pytest.raises(OSError):
        build(tmp_path, n_train=3, n_test=0, seed=9, overwrite=True)
    with pytest.raises(OSError):
        build(tmp_path, dataset_id=other_id, n_train=3, n_test=0)
    assert [p.name for p in tmp_path.iterdir()] == [root.name]
    assert np.array_equal(before, sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / first_image))))
