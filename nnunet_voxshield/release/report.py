"""What a protection run measured, per case and channel, on the values it wrote."""
import numpy as np

from nnunet_voxshield.release.metrics import psnr, ssim3d


def image_quality(clean: np.ndarray, protected: np.ndarray, window_raw: float) -> dict:
    """PSNR (paper scale: peak = the +-5 sigma window) and SSIM of one channel, over its nonzero voxels."""
    clean, protected = clean.astype(np.float64), protected.astype(np.float64)
    nonzero = clean != 0
    return {"psnr_db": float(psnr(clean, protected, window_raw, mask=nonzero)),
            "ssim": float(ssim3d(clean, protected, data_range=window_raw, mask=nonzero))}


def summarise_cases(case_reports: list[dict]) -> dict:
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
