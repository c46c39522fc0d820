"""Write the protected raw dataset: perturbed training images, everything else copied, and the run's report."""
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.job.atomic import save_json
from nnunet_voxshield.nnunet.bridge import delta_to_raw, resampler
from nnunet_voxshield.release.case_export import copy_dataset, write_protected_case
from nnunet_voxshield.method.objectives import zdiv_profile
from nnunet_voxshield.release.preview import save_preview
from nnunet_voxshield.release.report import summarise_cases
from nnunet_voxshield.release.survival import survival

REPORT = "voxshield.json"
PREVIEW = "voxshield_preview.png"
PROGRESS = ".voxshield_export.json"


def export_dataset(src, out, cases, deltas: dict, run_info: dict) -> Path:
    """Build the dataset in `out.partial` (resuming finished cases), then move it into place."""
    t0 = time.time()
    work = out.partial
    progress_file = work / PROGRESS
    done = _load(progress_file)
    if done.get("run_fingerprint") != run_info["run_fingerprint"]:
        # a partial export of a run with other settings: its cases must not be mixed into this one
        shutil.rmtree(work, ignore_errors=True)
        done = {"run_fingerprint": run_info["run_fingerprint"], "cases": {}}
    work.mkdir(parents=True, exist_ok=True)
    copy_dataset(src.raw, work, out.name.split("_", 1)[1])  # dataset.json's name field, e.g. BrainVoxShield
    clean_pre = src.preprocessed_dataset()
    for case in tqdm(cases, desc="writing protected cases"):
        if case.identifier in done["cases"]:
            continue
        src_files = src.files[case.identifier]["images"]
        dst_files = [str(work / "imagesTr" / Path(f).name) for f in src_files]
        delta = deltas[case.identifier].detach().cpu().numpy().astype(np.float64)
        eps_raw = case.eps_norm * case.grid.raw_per_norm
        channels = write_protected_case(src_files, dst_files, delta_to_raw(delta, case.grid), eps_raw,
                                        case.grid.window * case.grid.raw_per_norm)
        surv = None  # a case with nothing to perturb (empty label) is released unchanged
        if np.any(delta):
            surv = survival(case.grid, dst_files, np.asarray(clean_pre.load_case(case.identifier)[0]), delta,
                            src.plans_manager, src.configuration_manager, src.dataset_json)
        done["cases"][case.identifier] = {
            "identifier": case.identifier, "slice_axis": case.slice_axis,
            "foreground_voxels": case.foreground_voxels, "eps_norm": case.eps_norm.tolist(),
            "channels": channels,
            "survival": surv}
        save_json(done, progress_file)
    reports = [done["cases"][c.identifier] for c in cases]
    run_info["survival_accepted_below"] = require_survival(reports, run_info["settings"], work)
    preview_case = max(cases, key=lambda c: c.foreground_voxels)
    _preview(work / PREVIEW, clean_pre, preview_case, deltas[preview_case.identifier])
    run_info["timings_s"]["export"] = round(time.time() - t0, 1)
    save_json({**run_info, "source": src.name, "protected": out.name, "summary": summarise_cases(reports),
               "cases": reports}, work / REPORT)
    progress_file.unlink()
    return out.commit()


def require_survival(reports: list[dict], settings: dict, work: Path) -> list[str]:
    """A release whose perturbation nnU-Net's own preprocessing erases must not look like a success: refuse it
    (one line naming the cases) unless the user accepted it explicitly; return the accepted cases."""
    threshold = settings["min_survival"]
    low = {r["identifier"]: r["survival"]["corr"] for r in reports
           if r["survival"] is not None and not r["survival"]["corr"] >= threshold}
    if low and not settings["accept_low_survival"]:
        worst = ", ".join(f"{k} {v:.2f}" for k, v in sorted(low.items(), key=lambda kv: kv[1])[:5])
        raise VoxShieldError(
            f"survival below {threshold} in {len(low)} of {len(reports)} case(s) ({worst}): nnU-Net's preprocessing "
            f"of the written files does not reproduce the optimised perturbation there, so no victim would see it; "
            f"nothing was released ({work.name} is kept). Narrow --roi, or rerun with --accept-low-survival to "
            f"release it anyway")
    if low:
        print(f"voxshield: warning: releasing {len(low)} case(s) whose survival is below {threshold} "
              f"(--accept-low-survival): {', '.join(sorted(low))}")
    return sorted(low)


def _preview(path: Path, clean_pre, case, delta: torch.Tensor) -> None:
    """Slices of the case in nnU-Net's preprocessed space, clean and with R(delta)."""
    x = np.asarray(clean_pre.load_case(case.identifier)[0], dtype=np.float32)
    with torch.no_grad():
        x_adv = x + resampler(case.grid)(delta.float()).numpy()
    save_preview(path, x, x_adv, case.slice_axis, f"{case.identifier}: clean vs protected", zdiv_profile)


def _load(path: Path) -> dict:
    import json
    return json.loads(path.read_text()) if path.is_file() else {}
