"""Writing protected raw files that keep the source's geometry, pixel type and format, within the budget.

nnU-Net's readers hand out float32 arrays, so the writer reads each source file itself with SimpleITK: the
perturbation is added in the source's own pixel type (rounded and clipped for integers), the budget is re-checked
on the values that will be written, and the image is written atomically with the source's geometry.
"""
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_voxshield.job.atomic import atomic_write, save_json
from nnunet_voxshield.release.report import image_quality
from nnunet_voxshield.errors import VoxShieldError

# nnU-Net readers whose arrays are SimpleITK's GetArrayFromImage layout (NibabelIO's transpose gives the same order)
SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO")
SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


def check_export_supported(plans_manager, dataset_json: dict) -> None:
    """Fail early, with the fix, for datasets whose files VoxShield cannot rewrite faithfully."""
    reader = plans_manager.image_reader_writer_class.__name__
    ending = dataset_json["file_ending"]
    if reader not in SUPPORTED_READERS or ending.lower() not in SUPPORTED_ENDINGS:
        raise VoxShieldError(f"dataset uses reader {reader} with '{ending}' files; VoxShield writes only "
                             f"{', '.join(SUPPORTED_ENDINGS)} read by {' or '.join(SUPPORTED_READERS)}: "
                             f"convert the images to .nii.gz")


def _file_ending(path: str) -> str:
    name = Path(path).name.lower()
    return next((e for e in SUPPORTED_ENDINGS if name.endswith(e)), Path(path).suffix)


def _read_source(path: str) -> sitk.Image:
    if _file_ending(path) not in SUPPORTED_ENDINGS:
        raise VoxShieldError(f"{path}: unsupported image format; VoxShield writes {', '.join(SUPPORTED_ENDINGS)}")
    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise VoxShieldError(f"{path}: only scalar 3D images can be protected (one file per channel)")
    keys = set(image.GetMetaDataKeys())
    slope = float(image.GetMetaData("scl_slope")) if "scl_slope" in keys else 1.0
    inter = float(image.GetMetaData("scl_inter")) if "scl_inter" in keys else 0.0
    if slope not in (0.0, 1.0) or inter != 0.0:
        raise VoxShieldError(f"{path}: NIfTI with intensity scaling (scl_slope/scl_inter) would change pixel type "
                             f"on rewrite; save the images unscaled (e.g. as float32) first")
    return image


def _apply_integer(original: np.ndarray, delta: np.ndarray, eps: float) -> np.ndarray:
    """Round to the pixel type; where rounding would exceed the budget, round toward the original instead."""
    step = np.rint(delta)
    over = np.abs(step) > eps
    step[over] = np.trunc(delta[over])
    info = np.iinfo(original.dtype)
    return np.clip(original.astype(np.int64) + step.astype(np.int64), info.min, info.max).astype(original.dtype)


def _apply_float(original: np.ndarray, delta: np.ndarray, eps: float) -> np.ndarray:
    """Add in float64, cast to the pixel type, and step back by an ulp where the cast overshoots the budget."""
    protected = (original.astype(np.float64) + delta).astype(original.dtype)
    for _ in range(4):
        over = np.abs(protected.astype(np.float64) - original) > eps
        if not over.any():
            return protected
        protected[over] = np.nextafter(protected[over], original[over])
    over = np.abs(protected.astype(np.float64) - original) > eps
    protected[over] = original[over]
    return protected


def _write_verified(image: sitk.Image, array: np.ndarray, path: str) -> None:
    """Write, then read back: SimpleITK's compressed writers can truncate silently on a full disk."""
    sitk.WriteImage(image, path, True)
    try:
        ok = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(path)), array)
    except RuntimeError:
        ok = False
    if not ok:
        raise OSError(errno.ENOSPC if shutil.disk_usage(Path(path).parent).free < 2 ** 20 else errno.EIO,
                      "the written file does not read back identically", path)


def write_protected_case(src_files: list[str], dst_files: list[str], delta_raw: np.ndarray,
                         eps_raw: np.ndarray, windows_raw: np.ndarray | None = None) -> list[dict]:
    """Write source + delta_raw (reader layout [C, z, y, x], raw units) per channel; one stats dict per channel.

    With `windows_raw` (the paper's +-5 sigma window per channel, raw units) the stats also hold PSNR and SSIM,
    measured on the values written, so no file is read twice.

    Guarantees on the written values: |protected - original| <= eps_raw[c] everywhere; voxels that are zero in
    every channel stay zero and no nonzero source voxel becomes zero (so nnU-Net's crop box is unchanged).
    """
    eps_raw = np.broadcast_to(np.asarray(eps_raw, dtype=np.float64), (len(src_files),))
    if len(dst_files) != len(src_files) or delta_raw.shape[0] != len(src_files):
        raise ValueError("one destination file and one delta channel per source file are needed")
    images = [_read_source(f) for f in src_files]
    originals = [sitk.GetArrayFromImage(im) for im in images]
    for f, arr in zip(src_files, originals):
        if arr.shape != delta_raw.shape[1:]:
            raise VoxShieldError(f"{f}: image shape {arr.shape} differs from the case's other files or its "
                                 f"preprocessed grid {delta_raw.shape[1:]}; run nnUNetv2_plan_and_preprocess "
                                 f"--verify_dataset_integrity")
    zero_everywhere = np.all([arr == 0 for arr in originals], axis=0)

    stats = []
    for c, (image, original, dst) in enumerate(zip(images, originals, dst_files)):
        eps = float(eps_raw[c])
        delta = np.asarray(delta_raw[c], dtype=np.float64)
        excess = float(np.abs(delta).max(initial=0.0)) - eps
        if excess > 1e-6 * max(eps, 1.0):
            raise ValueError(f"delta exceeds the budget by {excess:g} raw units in channel {c}")
        delta = np.clip(delta, -eps, eps)
        delta[zero_everywhere] = 0.0
        if np.issubdtype(original.dtype, np.integer):
            if eps < 1.0:
                raise VoxShieldError(f"budget rounds to zero for integer images ({original.dtype}, eps_raw="
                                     f"{eps:.3g} < 1): raise --eps or use --eps-raw >= 1")
            protected = _apply_integer(original, delta, eps)
        else:
            protected = _apply_float(original, delta, eps)
        became_zero = (protected == 0) & (original != 0)
        protected[became_zero] = original[became_zero]
        change = np.abs(protected.astype(np.float64) - original.astype(np.float64))
        if change.max(initial=0.0) > eps:  # the promise itself; unreachable unless the code above is wrong
            raise RuntimeError(f"budget violated after rounding in {dst}")

        out = sitk.GetImageFromArray(protected)
        out.CopyInformation(image)
        atomic_write(dst, lambda tmp: _write_verified(out, protected, tmp))  # tmp keeps the ending: same format
        stats.append({
            "file": Path(dst).name, "dtype": str(original.dtype), "eps_raw": eps,
            "max_abs_delta_raw": float(change.max(initial=0.0)),
            "budget_fraction": float(change.max(initial=0.0) / eps) if eps > 0 else 0.0,
            "mean_abs_delta_raw": float(change.mean()),
            "fraction_changed": float(np.mean(change > 0)),
            "l2_written_over_intended": float(np.linalg.norm(protected.astype(np.float64) - original)
                                              / max(np.linalg.norm(delta), 1e-30)),
            "n_reverted_to_keep_nonzero": int(became_zero.sum()),
            **({} if windows_raw is None else image_quality(original, protected, float(windows_raw[c]))),
        })
    return stats


def _copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy unless an identical copy (same size and mtime) is already there; a partial copy never has dst's name."""
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime == src.stat().st_mtime:
        return
    atomic_write(dst, lambda tmp: shutil.copy2(src, tmp))


def copy_dataset(src_root, dst_root, new_name: str) -> None:
    """Copy everything of a raw dataset except imagesTr (the protector writes those); rename it in dataset.json.

    The source is only read. Rerunning it is cheap and safe (files already copied are skipped).
    """
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    if not (src_root / "dataset.json").is_file():
        raise VoxShieldError(f"{src_root} has no dataset.json; point to an nnU-Net raw dataset folder")
    if dst_root == src_root or src_root in dst_root.parents or dst_root in src_root.parents:
        raise VoxShieldError(f"output {dst_root} overlaps the source {src_root}; choose another dataset id")
    (dst_root / "imagesTr").mkdir(parents=True, exist_ok=True)
    for path in sorted(src_root.rglob("*")):
        rel = path.relative_to(src_root)
        if rel.parts[0] == "imagesTr" or rel == Path("dataset.json"):
            continue
        if path.is_dir():
            (dst_root / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
            _copy_file_atomic(path, dst_root / rel)
    dataset_json = json.loads((src_root / "dataset.json").read_text())
    dataset_json["name"] = new_name
    save_json(dataset_json, dst_root / "dataset.json")
