"""Checks of the whole source dataset before any optimisation: bad input must fail in seconds, not after hours.

Cheap checks over every case: folder listing, disk space, image headers (no voxels read) and the integrity of gzip
streams. The voxels are decoded once, by case preparation (`job.cases`), which checks them there. Every problem
raises a one-line VoxShieldError that names the file or case and the fix. The source is only read.
"""
import gzip
import shutil
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.nnunet.env import require_env

OUTPUT_SIZE_MARGIN = 1.2  # rewritten images hold noise, which compresses worse than the source
VERIFY = "nnUNetv2_plan_and_preprocess --verify_dataset_integrity lists every such problem"


def preflight(src, settings) -> None:
    """Raise VoxShieldError for the first problem that would otherwise surface late (or silently) in a run."""
    check_case_files(src)
    check_free_space(src)
    headers = {i: {f: read_header(f) for f in (*src.files[i]["images"], src.files[i]["label"])}
               for i in src.identifiers}
    for identifier in src.identifiers:
        check_geometry(identifier, src.files[identifier], headers[identifier])
        if settings.eps_raw is not None:
            require_integer_budget(identifier, src.files[identifier]["images"], settings.eps_raw,
                                   [headers[identifier][f] for f in src.files[identifier]["images"]])
    for identifier in src.identifiers:
        for f in (*src.files[identifier]["images"], src.files[identifier]["label"]):
            verify_gzip(f)


def check_case_files(src) -> None:
    """One image per channel and one label per case, as nnU-Net's own listing would silently not enforce.

    nnU-Net lists a case's images by pattern, so a missing `_0001` file just shortens the list, and a label whose
    images are all gone just drops the case; the release would then lack cases its dataset.json announces.
    """
    dj = src.dataset_json
    n_channels, ending = len(dj["channel_names"]), dj["file_ending"]
    if "dataset" not in dj:
        labels = sorted(p.name[:-len(ending)] for p in (src.raw / "labelsTr").iterdir() if p.name.endswith(ending))
        orphans = [i for i in labels if i not in src.files]
        if orphans:
            raise VoxShieldError(f"case {orphans[0]} has a label but no image in imagesTr (expected "
                                 f"{orphans[0]}_0000{ending}); restore the image or remove the label")
    for identifier in src.identifiers:
        names = [Path(f).name for f in src.files[identifier]["images"]]
        if "dataset" in dj:
            if len(names) != n_channels:
                raise VoxShieldError(f"case {identifier} lists {len(names)} image(s) in dataset.json but "
                                     f"channel_names declares {n_channels}; list one image per channel")
            continue
        expected = [f"{identifier}_{c:04d}{ending}" for c in range(n_channels)]
        missing = [e for e in expected if e not in names]
        extra = [n for n in names if n not in expected]
        if missing or extra:
            problem = f"{missing[0]} is missing" if missing else f"{extra[0]} is not a declared channel"
            raise VoxShieldError(f"case {identifier}: {problem} (dataset.json declares {n_channels} channel(s)); "
                                 f"each case needs exactly {', '.join(expected)}")


def check_free_space(src) -> None:
    """The release is a full copy of the source (images rewritten); it must fit on nnUNet_raw's filesystem."""
    raw_root = require_env("nnUNet_raw")["nnUNet_raw"]
    images = sum(p.stat().st_size for p in (src.raw / "imagesTr").rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in src.raw.rglob("*") if p.is_file())
    needed = int(OUTPUT_SIZE_MARGIN * images + (total - images))
    free = shutil.disk_usage(raw_root).free
    if free < needed:
        raise VoxShieldError(f"not enough disk space on nnUNet_raw ({raw_root}): the protected dataset needs about "
                             f"{_mib(needed)} but {_mib(free)} is free; free space or point nnUNet_raw elsewhere")


def read_header(path: str) -> sitk.ImageFileReader:
    """Geometry and pixel type without reading the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise VoxShieldError(f"{path} cannot be read as an image (corrupt or not a "
                             f"{Path(path).suffix} file); replace it with a readable copy") from None
    return reader


def check_geometry(identifier: str, files: dict, headers: dict) -> None:
    """Every channel and the label on the first channel's voxel grid, with nnU-Net's tolerance (np.allclose)."""
    first = files["images"][0]
    ref = headers[first]
    for f in (*files["images"], files["label"]):
        h = headers[f]
        kind = "label" if f == files["label"] else "image"
        if h.GetDimension() != 3 or h.GetNumberOfComponents() != 1:
            raise VoxShieldError(f"{f} is not a scalar 3D image ({h.GetDimension()}D, {h.GetNumberOfComponents()} "
                                 f"component(s)); VoxShield protects 3D scans with one file per channel")
        if h.GetSize() != ref.GetSize():
            raise VoxShieldError(f"case {identifier}: {kind} {Path(f).name} has size {h.GetSize()} but "
                                 f"{Path(first).name} has {ref.GetSize()}; resample it onto the image grid "
                                 f"({VERIFY})")
        for what in ("Spacing", "Origin", "Direction"):
            a, b = getattr(h, f"Get{what}")(), getattr(ref, f"Get{what}")()
            if not np.allclose(a, b):
                raise VoxShieldError(f"case {identifier}: {kind} {Path(f).name} has {what.lower()} "
                                     f"{_fmt(a)} but {Path(first).name} has {_fmt(b)}; fix the file's header so "
                                     f"both share one voxel grid ({VERIFY})")


def require_integer_budget(identifier: str, image_files: list[str], eps_raw, headers=None) -> None:
    """Integer images change in whole steps: a raw budget below 1 would release the source unchanged.

    `eps_raw` is one value or one per channel; headers are read when not given.
    """
    eps_raw = np.broadcast_to(np.asarray(eps_raw, dtype=np.float64), (len(image_files),))
    for f, eps, h in zip(image_files, eps_raw, headers or [read_header(f) for f in image_files]):
        pixel = sitk.GetPixelIDValueAsString(h.GetPixelID())
        if "integer" in pixel and eps < 1:
            raise VoxShieldError(f"case {identifier}: {Path(f).name} holds {pixel} values but the raw budget is "
                                 f"{eps:.3g} < 1, so nothing would change; raise --eps or use --eps-raw >= 1")


def verify_gzip(path: str) -> None:
    """Refuse a truncated or damaged .gz: SimpleITK reads a missing tail as zeros without a word."""
    if not str(path).endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error):
        raise VoxShieldError(f"{path} is truncated or damaged (its gzip stream does not check out); replace it "
                             f"with a complete copy") from None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:.1f} MiB"
