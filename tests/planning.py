"""Planning helpers shared by the bridge and export tests: stock planning, plans with overrides, case files."""
import json

import numpy as np
import SimpleITK as sitk
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_voxshield.nnunet.env import run_nnunet

CONFIG = "3d_fullres"


def plan_datasets(*dataset_ids: int) -> None:
    """Stock fingerprint + plans (no preprocessing: the tests preprocess in memory) for several datasets at once."""
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", *map(str, dataset_ids), "-c", CONFIG, "-np", "1",
                "--no_pp", "--verify_dataset_integrity"], planning=True)


def load_plans(dirs, dataset_dir, transpose_forward=None, **configuration_overrides):
    """PlansManager, ConfigurationManager and dataset.json, with test overrides applied to the stock plans.

    Overriding the target spacing makes nnU-Net resample (all synthetic cases share one spacing, so the stock
    target spacing would make resampling a no-op).
    """
    plans_file = dirs["nnUNet_preprocessed"] / dataset_dir.name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    if transpose_forward is not None:
        plans["transpose_forward"] = list(transpose_forward)
        plans["transpose_backward"] = [int(i) for i in np.argsort(transpose_forward)]
    plans["configurations"][CONFIG].update(configuration_overrides)
    pm = PlansManager(plans)
    return pm, pm.get_configuration(CONFIG), json.loads((dataset_dir / "dataset.json").read_text())


def case_files(dataset_dir, identifier, n_channels, split="Tr"):
    ending = json.loads((dataset_dir / "dataset.json").read_text())["file_ending"]
    images = [str(dataset_dir / f"images{split}" / f"{identifier}_{c:04d}{ending}") for c in range(n_channels)]
    return images, str(dataset_dir / f"labels{split}" / f"{identifier}{ending}")


def read_zyx(files) -> np.ndarray:
    """The files as SimpleITK arrays, channels stacked: the layout nnU-Net's SimpleITKIO hands out."""
    return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in files])


def to_cropped(raw_zyx: np.ndarray, grid) -> np.ndarray:
    """Reader layout -> nnU-Net's cropped grid (transpose_forward, then the crop box)."""
    t = raw_zyx.transpose([0, *[i + 1 for i in grid.transpose_forward]])
    return t[(slice(None), *[slice(a, b) for a, b in grid.bbox])]


# channel 0: ZScore with mask, channel 1: CT (statistics from the plans); anisotropic with a non-trivial
# transpose, so that resampling takes nnU-Net's separate-z path along a transposed axis
