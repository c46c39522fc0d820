"""What every demo dataset shares: the atomic build of an nnU-Net raw dataset, the random smooth warp and the
MRI-like intensity variation of each case, and NIfTI writing on a RAS grid. The anatomy comes from the modules that
use it (`mni_tissues`, `atlas_regions`)."""
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from scipy.ndimage import zoom

from nnunet_voxshield.errors import VoxShieldError

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


def validate(dataset_id, name, n_train, n_test, spacing_mm) -> None:
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= dataset_id <= 999):
        raise VoxShieldError(f"dataset id must be an integer 1..999; got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        raise VoxShieldError(f"dataset name must be letters, digits, '_' or '-' (e.g. MNIBrain); got {name!r}")
    if n_train < 1 or n_test < 0:
        raise VoxShieldError(f"need n_train >= 1 and n_test >= 0; got n_train={n_train}, n_test={n_test}")
    if not 1.0 <= spacing_mm <= 8.0:
        raise VoxShieldError(f"spacing_mm must be in [1, 8] mm (4 gives about 40-50 voxels per side); "
                             f"got {spacing_mm}")


def swap_in(build: Path, target: Path, staging: Path) -> None:
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


def warped_points(grid: dict, rng: np.random.Generator) -> np.ndarray:
    """Template RAS coordinates for every output voxel: random rotation/scale/shift plus a smooth warp."""
    shape, spacing = grid["shape"], grid["spacing"]
    axes = [grid["origin_ras"][d] + spacing * np.arange(shape[d]) for d in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float64)
    centred = world - grid["centre_ras"].reshape(3, 1, 1, 1)
    matrix = rotation(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3)) @ np.diag(rng.uniform(*SCALE_RANGE, 3))
    moved = np.einsum("ij,j...->i...", matrix, centred)
    shift = rng.uniform(-SHIFT_MM, SHIFT_MM, 3)
    warp = np.stack([smooth_field(rng, shape, WARP_MM, WARP_CONTROL_POINTS) for _ in range(3)])
    return moved + (grid["centre_ras"] + shift).reshape(3, 1, 1, 1) + warp


def smooth_field(rng: np.random.Generator, shape, std: float, control_points: int) -> np.ndarray:
    """Low-frequency random field: Gaussian values on a coarse lattice, cubic-spline upsampled to `shape`."""
    coarse = rng.normal(0.0, std, (control_points,) * 3)
    return zoom(coarse, [s / control_points for s in shape], order=3, mode="nearest", grid_mode=True)


def rotation(degrees: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_nifti(array_xyz: np.ndarray, path: Path, grid: dict) -> None:
    """RAS-indexed array -> NIfTI via SimpleITK (LPS world: x and y flip sign, so the direction is diag(-1,-1,1))."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing((grid["spacing"],) * 3)
    ox, oy, oz = grid["origin_ras"]
    image.SetOrigin((-float(ox), -float(oy), float(oz)))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def build_raw_dataset(raw_root, dataset_id: int, name: str, overwrite: bool, write) -> Path:
    """Create `raw_root/DatasetXXX_name` atomically: `write(folder)` fills a fresh folder, swapped in when complete.

    Refuses an id used by another dataset, and an existing copy unless `overwrite`; on failure nothing changes.
    """
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
        write(build)
        swap_in(build, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_cases(root: Path, name: str, n_train: int, n_test: int, seed: int, grid: dict, make_case, labels: dict,
                **about) -> None:
    """Cases `name_000`... from `make_case(rng) -> (image, label)` (case i draws from rng [seed, i]) and dataset.json.

    `about`: description, reference, license and converted_by for dataset.json.
    """
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir()
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"{name.lower()}_{i:03d}"
        image, label = make_case(np.random.default_rng([seed, i]))
        write_nifti(image, root / f"images{split}" / f"{case}_0000.nii.gz", grid)
        write_nifti(label, root / f"labels{split}" / f"{case}.nii.gz", grid)
    generate_dataset_json(str(root), channel_names={0: "T1"}, labels=labels, num_training_cases=n_train,
                          file_ending=".nii.gz", dataset_name=name, **about)


def output_grid(centre_mm, size_mm, spacing_mm: float) -> dict:
    """An isotropic grid covering `size_mm` around `centre_mm` (RAS): shape, RAS mm of voxel (0, 0, 0), spacing, and
    the centre that the random rigid motion of each case turns about."""
    shape = np.round(np.asarray(size_mm) / spacing_mm).astype(int)
    origin = np.asarray(centre_mm) - (shape - 1) / 2 * spacing_mm
    return {"shape": tuple(int(s) for s in shape), "origin_ras": origin, "spacing": float(spacing_mm),
            "centre_ras": np.asarray(centre_mm, dtype=np.float64)}


def mri_intensities(t1: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Template T1 (about 0..1) -> one scan: gamma, smooth bias field, scale, Rician noise; zero off the brain."""
    t1 = np.clip(t1, 0.0, None) ** np.exp(rng.uniform(-GAMMA_LOG_RANGE, GAMMA_LOG_RANGE))
    t1 *= np.exp(smooth_field(rng, t1.shape, BIAS_LOG_STD, control_points=3))
    scale = rng.uniform(*INTENSITY_SCALE)
    sigma = rng.uniform(*NOISE_FRACTION) * scale
    # Rician noise, as in MR magnitude images (and never negative)
    t1 = np.hypot(t1 * scale + rng.normal(0.0, sigma, t1.shape), rng.normal(0.0, sigma, t1.shape))
    return np.where(brain, t1, 0.0).astype(np.float32)
