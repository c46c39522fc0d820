"""Case preparation: each training image is decoded once, checked, preprocessed by nnU-Net and given its budget.

The one read per case serves the finite-value check, nnU-Net's preprocessing (for the grid and the budget) and the
region delta may touch; nothing later reads the source image again until the writer adds the perturbation.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.job.preflight import require_integer_budget
from nnunet_voxshield.method.budget import eps_norm, movable, roi_mask
from nnunet_voxshield.method.objectives import select_slice_axis
from nnunet_voxshield.nnunet.bridge import CaseGrid, preprocess_case, read_case


@dataclass
class PreparedCase:
    """A training case with its grid, budget and region, ready for optimisation and export."""
    identifier: str
    grid: CaseGrid
    eps_norm: np.ndarray
    mask: np.ndarray               # cropped grid: where delta may be nonzero
    slice_axis: int
    foreground_voxels: int

    @property
    def labels(self) -> np.ndarray:
        """The label map on the cropped grid."""
        return self.grid.seg_cropped

    @property
    def perturbable(self) -> bool:
        return bool(self.mask.any())


def prepare_case(src, identifier: str, s) -> PreparedCase:
    """Read, check and preprocess one case for the settings `s` (a ProtectSettings)."""
    files = src.files[identifier]
    loaded = _read_checked(identifier, files, src.plans_manager)
    *_, grid = preprocess_case(files["images"], files["label"], src.plans_manager, src.configuration_manager,
                               src.dataset_json, identifier, loaded=loaded)
    mask = roi_mask(grid.seg_cropped, grid.nonzero_mask_cropped, s.roi) & movable(grid.headroom, grid.shape_cropped)
    eps = eps_norm(grid.window, grid.raw_per_norm, s.eps, s.eps_raw)
    require_integer_budget(identifier, files["images"], eps * grid.raw_per_norm)  # before hours of optimisation
    axis = select_slice_axis(grid.spacing_reader, grid.transpose_forward, s.slice_axis)
    return PreparedCase(identifier, grid, eps, mask, axis, int((grid.seg_cropped > 0).sum()))


def _read_checked(identifier: str, files: dict, plans_manager) -> tuple:
    """The plans' reader's arrays; NaN/Inf refused, since they poison nnU-Net's normalisation.

    SimpleITK reads NaN/Inf in NIfTI files as 0 (so nnU-Net never sees them there); other readers and formats pass
    them on, hence the check on the reader's arrays rather than on the file contents.
    """
    try:
        images, seg, properties = read_case(files["images"], files["label"], plans_manager)
    except Exception as e:  # any reader failure on a file that passed the header check is a damaged file
        raise VoxShieldError(f"case {identifier}: {plans_manager.image_reader_writer_class.__name__} cannot read "
                             f"its files ({type(e).__name__}); replace the damaged file with a readable copy") from None
    for c, f in enumerate(files["images"]):
        n_bad = int((~np.isfinite(images[c])).sum())
        if n_bad:
            raise VoxShieldError(f"case {identifier}: {Path(f).name} has {n_bad} NaN/Inf voxel(s); replace them "
                                 f"(e.g. with 0 or the background value) or remove the case")
    return images, seg, properties


def require_perturbable(cases: list[PreparedCase], roi: str) -> None:
    """Refuse a run where no case has a voxel to perturb; name the cases that will be released unchanged."""
    empty = [c.identifier for c in cases if not c.perturbable]
    if len(empty) == len(cases):
        why = ("every image is zero everywhere; check imagesTr" if roi == "all" else
               "every label is empty inside the image; use --roi all or check labelsTr")
        raise VoxShieldError(f"no training case has a voxel that --roi {roi} lets VoxShield perturb: {why}")
    if empty:
        hint = "" if roi == "all" else "; use --roi all to perturb them too"
        print(f"voxshield: note: {len(empty)} case(s) have no voxel that --roi {roi} lets VoxShield perturb "
              f"and are released unchanged: {', '.join(empty)}{hint}")
