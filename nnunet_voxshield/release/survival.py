"""How much of the optimised perturbation the victim's own preprocessing reproduces from the written files."""
import numpy as np
import torch

from nnunet_voxshield.nnunet.bridge import CaseGrid, preprocess_case, resampler


def compare(measured: np.ndarray, intended: np.ndarray) -> dict:
    """corr: Pearson correlation; rel_err: ||measured - intended|| / ||intended||;
    ratio_norm: ||measured|| / ||intended||."""
    m, i = measured.astype(np.float64).ravel(), intended.astype(np.float64).ravel()
    norm_i = np.linalg.norm(i)
    if norm_i == 0:
        return {"corr": float("nan"), "rel_err": float("nan"), "ratio_norm": float("nan")}
    dm, di = m - m.mean(), i - i.mean()
    denom = np.linalg.norm(dm) * np.linalg.norm(di)
    return {"corr": float(dm @ di / denom) if denom > 0 else 0.0,
            "rel_err": float(np.linalg.norm(m - i) / norm_i),
            "ratio_norm": float(np.linalg.norm(m) / norm_i)}


def intended_change(grid: CaseGrid, delta_cropped: np.ndarray) -> np.ndarray:
    """R(delta): the change the surrogate was shown, on the preprocessed grid."""
    with torch.no_grad():
        return resampler(grid)(torch.as_tensor(np.asarray(delta_cropped, dtype=np.float64))).numpy()


def survival(grid: CaseGrid, protected_files, clean_data_pre: np.ndarray, delta_cropped: np.ndarray,
             plans_manager, configuration_manager, dataset_json) -> dict:
    """Re-run nnU-Net's preprocessing on the protected files and compare pre(protected) - pre(clean) with R(delta).

    A value near 1 for corr and ratio_norm (and near 0 for rel_err) means the victim sees what was optimised.
    """
    protected_pre = preprocess_case(protected_files, grid.seg_file, plans_manager, configuration_manager,
                                    dataset_json, grid.identifier)[0]
    if protected_pre.shape != clean_data_pre.shape:
        return {"corr": 0.0, "rel_err": float("inf"), "ratio_norm": float("nan"), "same_grid": False}
    measured = protected_pre.astype(np.float64) - clean_data_pre
    return {**compare(measured, intended_change(grid, delta_cropped)), "same_grid": True}
