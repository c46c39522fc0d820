"""What a protection run measured, per case and channel, on the files it wrote."""
import numpy as np
import SimpleITK as sitk

from nnunet_voxshield.metrics import psnr, ssim3d


def channel_report(src_file: str, dst_file: str, eps_raw: float, window_raw: float) -> dict:
    """Budget, PSNR (paper scale: peak = the +-5 sigma window) and SSIM of one written channel file."""
    clean = sitk.GetArrayFromImage(sitk.ReadImage(src_file)).astype(np.float64)
    prot = sitk.GetArrayFromImage(sitk.ReadImage(dst_file)).astype(np.float64)
    nonzero = clean != 0
    max_abs = float(np.abs(prot - clean).max())
    return {"file": dst_file.split("/")[-1], "eps_raw": float(eps_raw), "max_abs_delta_raw": max_abs,
            "budget_fraction": max_abs / eps_raw if eps_raw > 0 else float("inf"),
            "psnr_db": float(psnr(clean, prot, window_raw, mask=nonzero)),
            "ssim": float(ssim3d(clean, prot, data_range=window_raw, mask=nonzero))}


def summarise(case_reports: list[dict]) -> dict:
    """Worst and mean figures over all cases and channels."""
    chans = [c for r in case_reports for c in r["channels"]]
    finite_psnr = [c["psnr_db"] for c in chans if np.isfinite(c["psnr_db"])]
    surv = [r["survival"]["corr"] for r in case_reports if r.get("survival")]
    return {"cases": len(case_reports),
            "max_budget_fraction": max(c["budget_fraction"] for c in chans),
            "min_psnr_db": min(finite_psnr) if finite_psnr else float("inf"),
            "mean_psnr_db": float(np.mean(finite_psnr)) if finite_psnr else float("inf"),
            "min_ssim": min(c["ssim"] for c in chans),
            "min_survival_corr": min(surv) if surv else None,
            "mean_survival_corr": float(np.mean(surv)) if surv else None}
