"""`nnUNetv2_voxshield_check`: prove budget, fidelity and survival on the files on disk (the promises 1-3 of the README)."""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_voxshield.nnunet.bridge import preprocess_case, to_cropped_grid
from nnunet_voxshield.config import MIN_SURVIVAL
from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.release.dataset_export import REPORT
from nnunet_voxshield.nnunet.env import dataset_name, require_env
from nnunet_voxshield.job.run_state import RunState
from nnunet_voxshield.nnunet.source import load_source
from nnunet_voxshield.release.survival import survival

COPIED = ("labelsTr", "imagesTs", "labelsTs")
GEOMETRY = ("GetSize", "GetSpacing", "GetOrigin", "GetDirection", "GetPixelIDValue", "GetNumberOfComponentsPerPixel")


@dataclass
class CheckResult:
    violations: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.violations.append(msg)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def check_fidelity(src: Path, prot: Path, res: CheckResult) -> None:
    sj, pj = (json.loads((d / "dataset.json").read_text()) for d in (src, prot))
    diff = sorted(k for k in set(sj) | set(pj) if k != "name" and sj.get(k) != pj.get(k))
    if diff:
        res.fail(f"dataset.json fields differ from the source: {', '.join(diff)}")
    for sub in ("imagesTr", *COPIED):
        if _files(src / sub) != _files(prot / sub):
            res.fail(f"{sub}: file names differ from the source")
    for sub in COPIED:
        for name in _files(src / sub):
            if (prot / sub / name).is_file() and _sha(src / sub / name) != _sha(prot / sub / name):
                res.fail(f"{sub}/{name} is not byte-identical to the source")
    for name in _files(src / "imagesTr"):
        if not (prot / "imagesTr" / name).is_file():
            continue
        a, b = (sitk.ReadImage(str(d / "imagesTr" / name)) for d in (src, prot))
        for g in GEOMETRY:
            va, vb = getattr(a, g)(), getattr(b, g)()
            if not np.allclose(va, vb, rtol=0, atol=1e-6):
                res.fail(f"imagesTr/{name}: {g[3:]} {vb} != source {va}")


def check_budget(src: Path, prot: Path, report: dict, res: CheckResult) -> float:
    """Max over all written channels of |protected - source| / eps_raw; all-zero source voxels must stay zero."""
    worst = 0.0
    for case in report["cases"]:
        arrays = []
        for ch in case["channels"]:
            s = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "imagesTr" / ch["file"]))).astype(np.float64)
            p = sitk.GetArrayFromImage(sitk.ReadImage(str(prot / "imagesTr" / ch["file"]))).astype(np.float64)
            frac = float(np.abs(p - s).max() / ch["eps_raw"])
            worst = max(worst, frac)
            if frac > 1 + 1e-6:
                res.fail(f"imagesTr/{ch['file']}: |delta| reaches {frac:.4f} x the budget {ch['eps_raw']:.6g}")
            arrays.append((s, p))
        zero = np.all([s == 0 for s, _ in arrays], axis=0)
        if any((p[zero] != 0).any() for _, p in arrays):
            res.fail(f"case {case['identifier']}: voxels that are zero in every source channel were changed "
                     f"(this moves nnU-Net's crop box)")
    return worst


def _optimised_deltas(report: dict) -> dict | None:
    """The run's final deltas, if its checkpoint is still in nnUNet_results (they are never shipped)."""
    folder = report.get("work_folder")
    run = RunState.find(folder, report.get("run_fingerprint")) if folder else None
    return None if run is None else run.deltas()


def check_survival(source, prot: Path, report: dict, min_corr: float, res: CheckResult) -> list[float]:
    """Re-run nnU-Net's preprocessing on the protected files and compare with the perturbation meant to survive."""
    optimised = _optimised_deltas(report)
    if optimised is None:
        res.lines.append("survival: run checkpoint not found; comparing with the written perturbation instead")
    corrs = []
    for case in tqdm(report["cases"], desc="survival"):
        ident = case["identifier"]
        files = source.files[ident]
        data_pre, _, _, grid = preprocess_case(files["images"], files["label"], source.plans_manager,
                                               source.configuration_manager, source.dataset_json, ident)
        prot_files = [str(prot / "imagesTr" / Path(f).name) for f in files["images"]]
        written = written_delta(files["images"], prot_files, grid, source.plans_manager)
        delta = optimised[ident].numpy().astype(np.float64) if optimised is not None else written
        if not np.any(delta):
            if np.any(written):
                res.fail(f"case {ident} was to be released unchanged (nothing to perturb) but its files differ")
            continue  # released unchanged: nothing to survive
        s = survival(grid, prot_files, data_pre, delta, source.plans_manager,
                     source.configuration_manager, source.dataset_json)
        corrs.append(s["corr"])
        if not s["corr"] >= min_corr:
            res.fail(f"case {ident}: only {s['corr']:.3f} correlation between the perturbation nnU-Net's "
                     f"preprocessing sees and the optimised one (need >= {min_corr})")
    return corrs


def written_delta(src_files, prot_files, grid, plans_manager) -> np.ndarray:
    """(protected - source) on nnU-Net's cropped grid, in normalised units."""
    rw = plans_manager.image_reader_writer_class()
    d = rw.read_images(prot_files)[0].astype(np.float64) - rw.read_images(src_files)[0].astype(np.float64)
    return to_cropped_grid(d, grid) / np.asarray(grid.raw_per_norm).reshape(-1, 1, 1, 1)


def check(source_id, protected_id, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
          min_survival: float = MIN_SURVIVAL) -> CheckResult:
    raw = require_env()["nnUNet_raw"]
    src_name, prot_name = dataset_name(source_id), dataset_name(protected_id)
    src, prot = raw / src_name, raw / prot_name
    if not (prot / REPORT).is_file():
        raise VoxShieldError(f"{prot} has no {REPORT}; is -pd a dataset written by nnUNetv2_voxshield_protect?")
    report = json.loads((prot / REPORT).read_text())
    if report.get("source") != src_name:
        raise VoxShieldError(f"{prot_name} was made from {report.get('source')}, not {src_name}; check -d")
    res = CheckResult()
    check_fidelity(src, prot, res)
    worst = check_budget(src, prot, report, res)
    source = load_source(source_id, configuration, plans)
    corrs = check_survival(source, prot, report, min_survival, res)
    res.lines += [f"source     {src_name}", f"protected  {prot_name}",
                  f"cases      {len(report['cases'])} training cases, "
                  f"{len(_files(src / 'imagesTs'))} test images and all labels checked",
                  f"budget     max |delta| / eps_raw = {worst:.4f} (must be <= 1)",
                  "fidelity   geometry, dtype, format, names, labels, dataset.json",
                  f"survival   correlation min {min(corrs, default=float('nan')):.4f} "
                  f"mean {np.mean(corrs) if corrs else float('nan'):.4f} over {len(corrs)} perturbed cases "
                  f"(must be >= {min_survival})"]
    return res
