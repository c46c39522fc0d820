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
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from nnunet_voxshield.demo import builder
from nnunet_voxshield.errors import VoxShieldError

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
TISSUE_THRESHOLD = 0.5
BRAIN_MASK_THRESHOLD = 0.2  # nilearn's own load_mni152_brain_mask default
# field of view in RAS mm around the template's brain (bounding box x -72..72, y -107..73, z -72..82)
FOV_CENTRE_MM = np.array([0.0, -17.0, 5.0])
FOV_SIZE_MM = np.array([168.0, 200.0, 172.0])


def build_demo_dataset(raw_root, dataset_id: int = 501, name: str = "MNIBrain", n_train: int = 12, n_test: int = 4,
                       seed: int = 0, spacing_mm: float = 4.0, overwrite: bool = False) -> Path:
    """Write `raw_root/DatasetXXX_name` (imagesTr/Ts, labelsTr/Ts, dataset.json) atomically; return its path."""
    builder.validate(dataset_id, name, n_train, n_test, spacing_mm)
    return builder.build_raw_dataset(raw_root, dataset_id, name, overwrite,
                                     lambda root: _write_dataset(root, name, n_train, n_test, seed, spacing_mm))


def _write_dataset(root: Path, name: str, n_train: int, n_test: int, seed: int, spacing_mm: float) -> None:
    anatomy = _load_anatomy(float(spacing_mm))
    grid = _output_grid(spacing_mm)
    builder.write_cases(
        root, name, n_train, n_test, seed, grid, lambda rng: _make_case(anatomy, grid, rng), LABELS,
        description=f"VoxShield demo: warped MNI152 brains at {spacing_mm:g} mm, CSF/GM/WM labels, seed {seed}",
        reference="MNI ICBM152 2009a nonlinear symmetric template (Fonov et al. 2011), as shipped with nilearn",
        license="see http://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
        converted_by="nnunet_voxshield.demo.mni_tissues")


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
    return builder.output_grid(FOV_CENTRE_MM, FOV_SIZE_MM, spacing_mm)


def _make_case(anatomy: dict, grid: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One warped, intensity-varied case on `grid`: (T1 float32, labels uint8), both indexed (x, y, z) in RAS."""
    points = builder.warped_points(grid, rng)  # (3, *shape) RAS mm in the template
    vox = np.einsum("ij,j...->i...", anatomy["world_to_voxel"][:3, :3], points) \
        + anatomy["world_to_voxel"][:3, 3].reshape(3, 1, 1, 1)
    sample = {k: map_coordinates(anatomy[k], vox, order=1, mode="constant", cval=0.0)
              for k in ("t1", "gm", "wm", "brain")}
    brain = sample["brain"] > 0.5
    tissue = np.where(sample["wm"] > sample["gm"], LABELS["WM"], LABELS["GM"])
    is_tissue = np.maximum(sample["gm"], sample["wm"]) > TISSUE_THRESHOLD
    label = np.where(brain, np.where(is_tissue, tissue, LABELS["CSF"]), LABELS["background"]).astype(np.uint8)

    return builder.mri_intensities(sample["t1"], brain, rng), label
