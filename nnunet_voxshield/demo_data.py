"""A small brain-MRI segmentation dataset with real anatomy, so the demo needs no download and no patient data.

Source: the MNI ICBM152 2009a (nonlinear, symmetric) skull-stripped T1 template and its grey/white-matter probability
maps, which ship inside the nilearn wheel (loaded from the package, never fetched). Each case is one random, smooth
warp of that anatomy plus MRI-like intensity variation, resampled to a coarse isotropic grid (4 mm: 42 x 50 x 43
voxels, x y z) so that plan + preprocess + protect of the whole demo runs in minutes on 2 CPU cores.

Labels (from the warped probability maps, sampled through the same field as the image):
    0 background  outside the brain mask (the template's own mask: T1 > 0.2 of its maximum)
    1 CSF         inside the brain mask, neither GM nor WM probability above 0.5 (ventricles, sulci)
    2 GM, 3 WM    the larger of the two probabilities, where it is above 0.5
The probability maps are interpolated linearly and thresholded on the target grid instead of taking the nearest
neighbour of a 1 mm label map: at 4 mm this keeps thin cortex as the majority tissue of each voxel.
The image is zero outside the brain mask, like skull-stripped MRI, so nnU-Net's crop-to-nonzero applies.
"""
import functools
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from nnunet_voxshield.errors import VoxShieldError

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
TISSUE_THRESHOLD = 0.5
BRAIN_MASK_THRESHOLD = 0.2  # nilearn's own load_mni152_brain_mask default
# field of view in RAS mm around the template's brain (bounding box x -72..72, y -107..73, z -72..82)
FOV_CENTRE_MM = np.array([0.0, -17.0, 5.0])
FOV_SIZE_MM = np.array([168.0, 200.0, 172.0])
# random variation per case
WARP_MM = 2.0            # std of the smooth displacement at each control point
WARP_CONTROL_POINTS = 4  # per axis: low-frequency warp
ROTATION_DEG = 5.0
SCALE_RANGE = (0.96, 1.04)
SHIFT_MM = 2.0
BIAS_LOG_STD = 0.12      # multiplicative bias field, log-domain std at each control point
GAMMA_LOG_RANGE = 0.25
INTENSITY_SCALE = (500.0, 1200.0)
NOISE_FRACTION = (0.01, 0.03)  # noise std relative to the intensity scale


def build_demo_dataset(raw_root, dataset_id: int = 501, name: str = "MNIBrain", n_train: int = 12, n_test: int = 4,
                       seed: int = 0, spacing_mm: float = 4.0, overwrite: bool = False) -> Path:
    """Write `raw_root/DatasetXXX_name` (imagesTr/Ts, labelsTr/Ts, dataset.json) atomically; return its path."""
    _validate(dataset_id, name, n_train, n_test, spacing_mm)
    raw_root = Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    target = raw_root / f"Dataset{dataset_id:03d}_{name}"
    clashes = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != target.name]
    if clashes:
        raise VoxShieldError(f"dataset id {dataset_id} is already used by {clashes[0]} in {raw_root}; "
                             f"choose another id")
    if target.exists() and not overwrite:
        raise VoxShieldError(f"{target} already exists; pass --overwrite (overwrite=True) to rebuild it "
                             f"or choose another dataset id")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building.", dir=raw_root))
    try:
        build = staging / target.name
        build.mkdir()  # made with the user's umask, unlike mkdtemp's private 0700 folder
        _write_dataset(build, name, n_train, n_test, seed, spacing_mm)
        _swap_in(build, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _validate(dataset_id, name, n_train, n_test, spacing_mm) -> None:
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= dataset_id <= 999):
        raise VoxShieldError(f"dataset id must be an integer 1..999; got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise VoxShieldError(f"dataset name must be letters, digits, '_' or '-' (e.g. MNIBrain); got {name!r}")
    if n_train < 1 or n_test < 0:
        raise VoxShieldError(f"need n_train >= 1 and n_test >= 0; got n_train={n_train}, n_test={n_test}")
    if not 1.0 <= spacing_mm <= 8.0:
        raise VoxShieldError(f"spacing_mm must be in [1, 8] mm (4 gives about 40-50 voxels per side); "
                             f"got {spacing_mm}")


def _swap_in(build: Path, target: Path, staging: Path) -> None:
    """Rename the finished folder into place; an old copy moves into `staging` (deleted by the caller) only then."""
    if not target.exists():
        build.rename(target)
        return
    old = staging / "previous"
    target.rename(old)
    try:
        build.rename(target)
    except BaseException:
        old.rename(target)
        raise


def _write_dataset(root: Path, name: str, n_train: int, n_test: int, seed: int, spacing_mm: float) -> None:
    anatomy = _load_anatomy(float(spacing_mm))
    grid = _output_grid(spacing_mm)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir()
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"{name.lower()}_{i:03d}"
        image, label = _make_case(anatomy, grid, np.random.default_rng([seed, i]))
        _write_nifti(image, root / f"images{split}" / f"{case}_0000.nii.gz", grid)
        _write_nifti(label, root / f"labels{split}" / f"{case}.nii.gz", grid)
    generate_dataset_json(
        str(root), channel_names={0: "T1"}, labels=LABELS, num_training_cases=n_train, file_ending=".nii.gz",
        dataset_name=name,
        description=f"VoxShield demo: warped MNI152 brains at {spacing_mm:g} mm, CSF/GM/WM labels, seed {seed}",
        reference="MNI ICBM152 2009a nonlinear symmetric template (Fonov et al. 2011), as shipped with nilearn",
        license="see http://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
        converted_by="nnunet_voxshield.demo_data")


@functools.lru_cache(maxsize=2)
def _load_anatomy(spacing_mm: float) -> dict:
    """The template maps at 1 mm, pre-smoothed against aliasing when sampled at `spacing_mm`."""
    try:
        from nilearn import datasets  # optional dependency; its package data needs no network
    except ImportError:
        raise VoxShieldError("the demo dataset needs nilearn; pip install 'nnunet-voxshield[demo]'") from None

    t1_img = datasets.load_mni152_template()
    maps = {
        "t1": t1_img.get_fdata(dtype=np.float32),
        "gm": datasets.load_mni152_gm_template().get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template().get_fdata(dtype=np.float32),
    }
    maps["brain"] = (maps["t1"] > BRAIN_MASK_THRESHOLD).astype(np.float32)
    sigma = 0.4 * (spacing_mm - 1.0)  # in 1 mm voxels; 0 at the template's own resolution
    if sigma > 0:
        maps = {k: gaussian_filter(v, sigma) for k, v in maps.items()}
    maps["world_to_voxel"] = np.linalg.inv(t1_img.affine)
    return maps


def _output_grid(spacing_mm: float) -> dict:
    shape = np.round(FOV_SIZE_MM / spacing_mm).astype(int)
    origin = FOV_CENTRE_MM - (shape - 1) / 2 * spacing_mm  # RAS mm of voxel (0, 0, 0)
    return {"shape": tuple(int(s) for s in shape), "origin_ras": origin, "spacing": float(spacing_mm)}


def _make_case(anatomy: dict, grid: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One warped, intensity-varied case on `grid`: (T1 float32, labels uint8), both indexed (x, y, z) in RAS."""
    shape = grid["shape"]
    points = _warped_points(grid, rng)  # (3, *shape) RAS mm in the template
    vox = np.einsum("ij,j...->i...", anatomy["world_to_voxel"][:3, :3], points) \
        + anatomy["world_to_voxel"][:3, 3].reshape(3, 1, 1, 1)
    sample = {k: map_coordinates(anatomy[k], vox, order=1, mode="constant", cval=0.0)
              for k in ("t1", "gm", "wm", "brain")}
    brain = sample["brain"] > 0.5
    tissue = np.where(sample["wm"] > sample["gm"], LABELS["WM"], LABELS["GM"])
    is_tissue = np.maximum(sample["gm"], sample["wm"]) > TISSUE_THRESHOLD
    label = np.where(brain, np.where(is_tissue, tissue, LABELS["CSF"]), LABELS["background"]).astype(np.uint8)

    t1 = np.clip(sample["t1"], 0.0, None) ** np.exp(rng.uniform(-GAMMA_LOG_RANGE, GAMMA_LOG_RANGE))
    t1 *= np.exp(_smooth_field(rng, shape, BIAS_LOG_STD, control_points=3))
    scale = rng.uniform(*INTENSITY_SCALE)
    sigma = rng.uniform(*NOISE_FRACTION) * scale
    # Rician noise, as in MR magnitude images (and never negative)
    t1 = np.hypot(t1 * scale + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))
    image = np.where(brain, t1, 0.0).astype(np.float32)
    return image, label


def _warped_points(grid: dict, rng: np.random.Generator) -> np.ndarray:
    """Template RAS coordinates for every output voxel: random rotation/scale/shift plus a smooth warp."""
    shape, spacing = grid["shape"], grid["spacing"]
    axes = [grid["origin_ras"][d] + spacing * np.arange(shape[d]) for d in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float64)
    centred = world - FOV_CENTRE_MM.reshape(3, 1, 1, 1)
    matrix = _rotation(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3)) @ np.diag(rng.uniform(*SCALE_RANGE, 3))
    moved = np.einsum("ij,j...->i...", matrix, centred)
    shift = rng.uniform(-SHIFT_MM, SHIFT_MM, 3)
    warp = np.stack([_smooth_field(rng, shape, WARP_MM, WARP_CONTROL_POINTS) for _ in range(3)])
    return moved + (FOV_CENTRE_MM + shift).reshape(3, 1, 1, 1) + warp


def _smooth_field(rng: np.random.Generator, shape, std: float, control_points: int) -> np.ndarray:
    """Low-frequency random field: Gaussian values on a coarse lattice, cubic-spline upsampled to `shape`."""
    coarse = rng.normal(0.0, std, (control_points,) * 3)
    return zoom(coarse, [s / control_points for s in shape], order=3, mode="nearest", grid_mode=True)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _write_nifti(array_xyz: np.ndarray, path: Path, grid: dict) -> None:
    """RAS-indexed array -> NIfTI via SimpleITK (LPS world: x and y flip sign, so the direction is diag(-1,-1,1))."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing((grid["spacing"],) * 3)
    ox, oy, oz = grid["origin_ras"]
    image.SetOrigin((-float(ox), -float(oy), float(oz)))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)
