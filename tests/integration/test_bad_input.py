"""Bad input, tried as a new user would, through the real command-line entry points.

Every case must end with exit code 2 and exactly one stderr line `voxshield: error: ...` that names the fix (progress
bars aside), no traceback, no dataset under the final output name, and a source dataset whose bytes are unchanged.
One planned dataset serves all cases; a case that must break the data gets its own copy under a new id, with the
plans copied rather than re-planned.
"""
import errno
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_voxshield.cli import check as check_cli
from nnunet_voxshield.cli import protect as protect_cli
from nnunet_voxshield.errors import _filesystem_of
from nnunet_voxshield.nnunet.env import plan_and_preprocess
from synthetic import make_raw_dataset, tree_hash

pytestmark = pytest.mark.slow  # real nnU-Net planning and training

SRC = 981
NAME = f"Dataset{SRC}_Tiny"
FAST = ["-device", "cpu", "--rounds", "1", "--surrogate-iters", "1", "--probe-every", "0"]
PROGRESS_BAR = re.compile(r"\d+%\|.*\|.*\]\s*$")
IMAGE, LABEL = "imagesTr/tiny_000_0000.nii.gz", "labelsTr/tiny_000.nii.gz"
DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture(scope="module")
def planned(nnunet_module_dirs):
    """A tiny float32 MRI-like dataset, planned and preprocessed once by stock nnU-Net."""
    dirs = nnunet_module_dirs
    make_raw_dataset(dirs["nnUNet_raw"], SRC, n_train=4, n_test=1, shape=(16, 32, 32))
    plan_and_preprocess(SRC)
    source_hash = tree_hash(dirs["nnUNet_raw"] / NAME)
    yield dirs
    assert tree_hash(dirs["nnUNet_raw"] / NAME) == source_hash, "the shared source dataset was modified"


def variant(dirs, vid: int, preprocessed: bool = True) -> Path:
    """A copy of the source under id `vid` (raw, and plans + preprocessed data unless told otherwise)."""
    name = f"Dataset{vid}_Tiny"
    raw = dirs["nnUNet_raw"] / name
    shutil.copytree(dirs["nnUNet_raw"] / NAME, raw)
    if preprocessed:
        pre = dirs["nnUNet_preprocessed"] / name
        shutil.copytree(dirs["nnUNet_preprocessed"] / NAME, pre)
        edit_plans(pre, lambda plans: plans.__setitem__("dataset_name", name))
    return raw


def edit_plans(pre: Path, edit) -> None:
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    edit(plans)
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))


def rewrite(path: Path, array=None, **geometry) -> None:
    """Rewrite an image with new voxels (a function of the old ones) and/or Set<Attr> geometry."""
    image = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(image)
    new = sitk.GetImageFromArray(array(arr) if array else arr)
    for attr in ("Spacing", "Origin", "Direction"):
        getattr(new, f"Set{attr}")(geometry.get(attr, getattr(image, f"Get{attr}")()))
    sitk.WriteImage(new, str(path), True)


def fails(capsys, args, *fragments, main=protect_cli.main, sources=()) -> str:
    """Run a CLI that must refuse; return its one error line after checking exit code, stderr and source bytes."""
    before = {p: tree_hash(p) for p in sources}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [s for s in (line.split("\r")[-1] for line in err.splitlines()) if s.strip() and not PROGRESS_BAR.search(s)]
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("voxshield: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    for p, h in before.items():
        assert tree_hash(p) == h, f"{p} was modified"
    return lines[0]


def _shape(raw):
    rewrite(raw / LABEL, array=lambda a: a[:-1])


def _one_voxel(value):
    """A NaN/Inf voxel, in a dataset planned with NibabelIO (SimpleITK itself reads NaN/Inf in NIfTI as 0)."""
    def set_voxel(a):
        a.flat[7] = value
        return a

    def breaks(raw):
        rewrite(raw / IMAGE, array=set_voxel)
        edit_plans(raw.parent.parent / "nnUNet_preprocessed" / raw.name,
                   lambda plans: plans.__setitem__("image_reader_writer", "NibabelIO"))
    return breaks


def _empty_labels(raw):
    for f in (raw / "labelsTr").iterdir():
        rewrite(f, array=np.zeros_like)


def _garbage(raw):
    (raw / IMAGE).write_bytes(b"this is not an image" * 100)


def _truncated(raw):
    data = (raw / IMAGE).read_bytes()
    (raw / IMAGE).write_bytes(data[:len(data) // 2])


def _int16(raw):
    for f in (raw / "imagesTr").iterdir():
        rewrite(f, array=lambda a: np.round(a).astype(np.int16))


# (name, how the copy is broken, extra CLI arguments, fragments the one error line must contain)
DATA_CASES = [
    ("label_shape", _shape, [], ["label tiny_000.nii.gz has size (32, 32, 15)", "resample it onto the image grid"]),
    ("label_spacing", lambda raw: rewrite(raw / LABEL, Spacing=(1.0, 1.0, 2.0)),
     [], ["label tiny_000.nii.gz has spacing", "fix the file's header"]),
    ("label_origin", lambda raw: rewrite(raw / LABEL, Origin=(0.0, 0.0, 0.0)),
     [], ["label tiny_000.nii.gz has origin", "fix the file's header"]),
    ("label_direction", lambda raw: rewrite(raw / LABEL, Direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
     [], ["label tiny_000.nii.gz has direction", "fix the file's header"]),
    ("image_missing", lambda raw: (raw / IMAGE).unlink(),
     [], ["case tiny_000 has a label but no image", "restore the image or remove the label"]),
    ("channel_misnamed", lambda raw: (raw / IMAGE).rename(raw / "imagesTr/tiny_000_0001.nii.gz"),
     [], ["tiny_000_0000.nii.gz is missing", "each case needs exactly tiny_000_0000.nii.gz"]),
    ("nan_voxel", _one_voxel(np.nan), [], ["tiny_000_0000.nii.gz has 1 NaN/Inf voxel(s)", "replace them"]),
    ("inf_voxel", _one_voxel(-np.inf), [], ["tiny_000_0000.nii.gz has 1 NaN/Inf voxel(s)", "replace them"]),
    ("all_labels_empty", _empty_labels, [], ["every label is empty", "use --roi all"]),
    ("corrupt_file", _garbage, [], ["tiny_000_0000.nii.gz cannot be read as an image", "replace it"]),
    ("truncated_file", _truncated, [], ["tiny_000_0000.nii.gz is truncated or damaged", "replace it with a complete"]),
    ("integer_budget_below_one", _int16, ["--eps-raw", "0.5"],
     ["16-bit signed integer", "raw budget is 0.5 < 1", "use --eps-raw >= 1"]),
]


@pytest.mark.parametrize("name,breaks,extra,fragments", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_broken_data_is_refused(planned, capsys, name, breaks, extra, fragments):
    vid = 900 + [c[0] for c in DATA_CASES].index(name)
    raw = variant(planned, vid)
    breaks(raw)
    fails(capsys, ["-d", vid, *FAST, *extra], *fragments, sources=[raw])


# (name, CLI arguments, fragments); the shared source is used as it is
ARGUMENT_CASES = [
    ("unknown_dataset", ["-d", 555], ["dataset 555 not found", "check -d"]),
    ("eps_zero", ["-d", SRC, "--eps", "0"], ["--eps must be in (0, 0.2510]"]),
    ("eps_negative", ["-d", SRC, "--eps=-4/255"], ["--eps must be in (0, 0.2510]"]),
    ("eps_absurd", ["-d", SRC, "--eps", "1000"], ["--eps must be in (0, 0.2510]"]),
    ("eps_raw_zero", ["-d", SRC, "--eps-raw", "0"], ["--eps-raw must be a positive"]),
    ("eps_and_eps_raw", ["-d", SRC, "--eps", "4/255", "--eps-raw", "3"], ["either --eps or --eps-raw"]),
    ("bad_roi", ["-d", SRC, "--roi", "dilate:x"], ["--roi must be label, all or dilate:N"]),
    ("config_2d", ["-d", SRC, "-c", "2d"], ["is 2d; VoxShield needs a 3d configuration"]),
    ("unknown_plans", ["-d", SRC, "-p", "nnUNetResEncUNetMPlans"], ["not planned with nnUNetResEncUNetMPlans",
                                                                     "run nnUNetv2_plan_and_preprocess"]),
    ("output_id_is_source", ["-d", SRC, "-o", SRC], ["other than the source's"]),
    ("num_gpus_zero", ["-d", SRC, "-num_gpus", "0"], ["-num_gpus must be >= 1"]),
    ("num_gpus_over_batch", ["-d", SRC, "-num_gpus", "64"], ["exceed the planned batch size", "-num_gpus"]),
    ("init_of_a_baseline", ["-d", SRC, "--method", "random", "--init", "codes"], ["--method random is not optimised"]),
    ("init_of_the_generator", ["-d", SRC, "--method", "generator", "--init", "codes"],
     ["--method generator starts from its generator's weights"]),
    ("reinit_of_targeted", ["-d", SRC, "--method", "targeted", "--warm-start", "x.pth", "--reinit-every", "2"],
     ["0 with --method targeted"]),
    ("free_band_without_a_code", ["-d", SRC, "--free-band", "1"], ["--free-band refines a start", "--init codes"]),
    ("eot_hard_out_of_range", ["-d", SRC, "--eot-hard", "1.5"], ["--eot-hard is a share", "[0, 1]"]),
    ("eot_hard_without_eot", ["-d", SRC, "--eot-hard", "0.5", "--no-eot"], ["--eot-hard", "without --no-eot"]),
    ("absence_on_the_labels", ["-d", SRC, "--method", "absence"], ["--method absence codes the background",
                                                                   "--roi all"]),
    ("rim_on_the_labels", ["-d", SRC, "--method", "rim"], ["--method rim codes the background", "--roi all"]),
]


@pytest.mark.parametrize("name,args,fragments", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_bad_arguments_are_refused(planned, capsys, name, args, fragments):
    fails(capsys, [*args, *FAST], *fragments, sources=[planned["nnUNet_raw"] / NAME])


def test_missing_environment_variable(planned, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")
    fails(capsys, ["-d", SRC, *FAST], "nnUNet_raw not set; export it", sources=[planned["nnUNet_raw"] / NAME])


def test_not_planned_and_not_preprocessed(planned, capsys):
    raw = variant(planned, 931, preprocessed=False)
    fails(capsys, ["-d", 931, *FAST], "not planned with nnUNetPlans", "nnUNetv2_plan_and_preprocess -d 931",
          sources=[raw])
    pre = planned["nnUNet_preprocessed"] / "Dataset931_Tiny"
    pre.mkdir()
    shutil.copy(planned["nnUNet_preprocessed"] / NAME / "nnUNetPlans.json", pre)
    edit_plans(pre, lambda plans: plans.__setitem__("dataset_name", "Dataset931_Tiny"))
    fails(capsys, ["-d", 931, *FAST], "planned but not preprocessed for 3d_fullres",
          "nnUNetv2_plan_and_preprocess -d 931 -c 3d_fullres", sources=[raw])


def test_2d_only_plans(planned, capsys):
    raw = variant(planned, 932)
    edit_plans(planned["nnUNet_preprocessed"] / "Dataset932_Tiny",
               lambda plans: [plans["configurations"].pop(c) for c in list(plans["configurations"]) if c != "2d"])
    fails(capsys, ["-d", 932, *FAST], "configuration '3d_fullres' is not in nnUNetPlans.json (has: 2d)",
          "pick one with -c", sources=[raw])


def test_output_id_already_used(planned, capsys):
    other = variant(planned, 933, preprocessed=False)
    fails(capsys, ["-d", SRC, "-o", 933, *FAST], "dataset id 933 is already used by Dataset933_Tiny",
          "choose another -o", sources=[planned["nnUNet_raw"] / NAME, other])
    (planned["nnUNet_raw"] / "Dataset734_TinyVoxShield").mkdir()
    fails(capsys, ["-d", SRC, "-o", 734, *FAST], "Dataset734_TinyVoxShield already exists", "add --overwrite",
          sources=[planned["nnUNet_raw"] / NAME])


def test_read_only_nnunet_raw(planned, capsys, monkeypatch):
    raw_root = planned["nnUNet_raw"]
    if os.geteuid() == 0:  # root ignores permission bits: emulate the answer a normal user gets
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k:
                            False if Path(p) == raw_root and mode == os.W_OK else real_access(p, mode, *a, **k))
    raw_root.chmod(0o555)
    try:
        fails(capsys, ["-d", SRC, "-o", 735, *FAST], f"nnUNet_raw ({raw_root}) is not writable",
              "point nnUNet_raw elsewhere", sources=[raw_root / NAME])
    finally:
        raw_root.chmod(0o755)


def test_not_enough_disk_space(planned, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(total=10 ** 9, used=10 ** 9 - 1000, free=1000))
    fails(capsys, ["-d", SRC, "-o", 736, *FAST], "not enough disk space on nnUNet_raw",
          "free space or point nnUNet_raw elsewhere", sources=[planned["nnUNet_raw"] / NAME])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_cuda_without_gpu(planned, capsys):
    fails(capsys, ["-d", SRC, "-device", "cuda"], "no CUDA GPU is visible; use -device cpu",
          sources=[planned["nnUNet_raw"] / NAME])


def test_continue_with_nothing_to_resume(planned, capsys):
    fails(capsys, ["-d", SRC, "-o", 737, *FAST, "--continue"], "--continue: nothing to resume",
          "run without --continue", sources=[planned["nnUNet_raw"] / NAME])
    assert not (planned["nnUNet_raw"] / "Dataset737_TinyVoxShield").exists()


@pytest.mark.parametrize("code,fragment", [(errno.ENOSPC, "disk full: free space on "),
                                           (errno.EACCES, "permission denied on "),
                                           (errno.EROFS, "read-only filesystem at ")])
def test_os_error_while_writing_leaves_no_dataset(planned, capsys, monkeypatch, code, fragment):
    """The OS refuses a write of the export; --method random reaches the export without an optimisation."""
    out_id = {errno.ENOSPC: 740, errno.EACCES: 741, errno.EROFS: 742}[code]
    real_copy = shutil.copy2

    def refuse(src, dst, *a, **k):
        if ".partial" in str(dst):  # shutil's own ENOSPC carries no file name; permission errors do
            raise OSError(code, os.strerror(code), *([] if code == errno.ENOSPC else [str(dst)]))
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", refuse)
    args = ["-d", SRC, "-o", out_id, "--method", "random", "-device", "cpu"]
    line = fails(capsys, args, fragment, "rerun to resume" if code != errno.EACCES else "fix its permissions",
                 sources=[planned["nnUNet_raw"] / NAME])
    if code == errno.ENOSPC:  # no file name in the error: the message names nnUNet_raw's filesystem
        assert f"free space on {_filesystem_of(str(planned['nnUNet_raw']))}" in line
    assert not list(planned["nnUNet_raw"].glob(f"Dataset{out_id}_*")), "a half-written dataset has the final name"
    if code == errno.ENOSPC:  # space freed: the same command finishes the dataset
        monkeypatch.setattr(shutil, "copy2", real_copy)
        assert protect_cli.main([str(a) for a in args]) == 0
        assert (planned["nnUNet_raw"] / f"Dataset{out_id}_TinyVoxShield" / "voxshield.json").is_file()


def test_one_empty_label_is_released_unperturbed(planned, capsys):
    """Documented safe behaviour: a case with nothing to perturb under --roi label is copied unchanged, not refused."""
    raw = variant(planned, 934)
    rewrite(raw / LABEL, array=np.zeros_like)
    before = tree_hash(raw)
    assert protect_cli.main(["-d", "934", "-o", "743", *FAST]) == 0
    note = "1 case(s) have no voxel that --roi label lets VoxShield perturb and are released unchanged: tiny_000"
    assert note in capsys.readouterr().out
    assert tree_hash(raw) == before
    out = planned["nnUNet_raw"] / "Dataset743_TinyVoxShield"
    report = {c["identifier"]: c for c in json.loads((out / "voxshield.json").read_text())["cases"]}
    assert report["tiny_000"]["foreground_voxels"] == 0
    assert report["tiny_000"]["channels"][0]["max_abs_delta_raw"] == 0
    assert report["tiny_001"]["channels"][0]["max_abs_delta_raw"] > 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / IMAGE))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(raw / IMAGE))))


def test_check_on_a_dataset_that_is_not_protected(planned, capsys):
    fails(capsys, ["-d", SRC, "-pd", SRC], "has no voxshield.json", "written by nnUNetv2_voxshield_protect",
          main=check_cli.main, sources=[planned["nnUNet_raw"] / NAME])


def test_interrupted_export_is_not_mixed_with_a_run_of_other_settings(planned, capsys, monkeypatch):
    real_write, calls = sitk.WriteImage, []

    def full_after_two_images(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(*a, **k)

    monkeypatch.setattr(sitk, "WriteImage", full_after_two_images)
    args = ["-d", SRC, "-o", 744, "--method", "random", "-device", "cpu"]
    fails(capsys, args, "disk full", sources=[planned["nnUNet_raw"] / NAME])
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert protect_cli.main([str(a) for a in [*args, "--eps", "8/255", "--overwrite"]]) == 0
    report = json.loads((planned["nnUNet_raw"] / "Dataset744_TinyVoxShield" / "voxshield.json").read_text())
    assert [c["eps_norm"][0] for c in report["cases"]] == pytest.approx([8 / 255 * 10] * 4)


def test_check_accepts_a_case_released_unperturbed(planned):
    out = planned["nnUNet_raw"] / "Dataset743_TinyVoxShield"
    if not out.exists():
        pytest.skip("needs the protected dataset of test_one_empty_label_is_released_unperturbed")
    assert np.isfinite(json.loads((out / "voxshield.json").read_text())["summary"]["min_survival_corr"])
    assert check_cli.main(["-d", "934", "-pd", "743"]) == 0


def unplanned_source(root: Path):
    """What preflight reads of a Source, for datasets that need no planning to be checked."""
    from types import SimpleNamespace

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    dataset_json = json.loads((root / "dataset.json").read_text())
    files = get_filenames_of_train_images_and_targets(str(root), dataset_json)
    return SimpleNamespace(raw=root, dataset_json=dataset_json, files=files, identifiers=sorted(files),
                           plans_manager=SimpleNamespace(image_reader_writer_class=SimpleITKIO))


VALID = {"ct_int16_body_anisotropic": dict(channels=("CT",), dtype=np.int16, body=True, spacing_xyz=(1, 1, 2.5)),
         "two_channels_mha": dict(channels=("MRI", "T2"), file_ending=".mha"),
         "uint8_nrrd_varying_shapes": dict(dtype=np.uint8, file_ending=".nrrd", vary_shape=True)}


@pytest.mark.parametrize("kind", VALID)
def test_preflight_accepts_valid_datasets(nnunet_dirs, capsys, kind):
    from types import SimpleNamespace

    from nnunet_voxshield.job.preflight import preflight
    src = unplanned_source(make_raw_dataset(nnunet_dirs["nnUNet_raw"], 970, n_train=3, n_test=1,
                                            shape=(12, 20, 20), **VALID[kind]))
    for roi in ("label", "all", "dilate:2"):
        preflight(src, SimpleNamespace(roi=roi, eps_raw=None))
    preflight(src, SimpleNamespace(roi="label", eps_raw=1.0))
    assert capsys.readouterr().out == ""


def test_missing_second_channel_and_per_channel_integer_budget(nnunet_dirs):
    """nnU-Net's listing just shortens a case's image list when `_0001` is gone; preflight names the file."""
    from types import SimpleNamespace

    from nnunet_voxshield.errors import VoxShieldError
    from nnunet_voxshield.job.preflight import preflight, require_integer_budget
    root = make_raw_dataset(nnunet_dirs["nnUNet_raw"], 971, n_train=2, n_test=0, shape=(12, 20, 20),
                            channels=("MRI", "T2"), dtype=np.int16)
    files = [str(root / f"imagesTr/tiny_000_000{c}.nii.gz") for c in range(2)]
    require_integer_budget("tiny_000", files, [1.0, 3.0])
    with pytest.raises(VoxShieldError, match=r"tiny_000_0001.nii.gz holds 16-bit signed integer .* 0.9 < 1"):
        require_integer_budget("tiny_000", files, [1.0, 0.9])
    (root / "imagesTr/tiny_001_0001.nii.gz").unlink()
    with pytest.raises(VoxShieldError, match=r"case tiny_001: tiny_001_0001.nii.gz is missing .* declares 2 "):
        preflight(unplanned_source(root), SimpleNamespace(roi="label", eps_raw=None))
