"""`nnUNetv2_voxshield_demo`: build a small real-anatomy dataset, plan, preprocess, protect, check, summarise."""
import argparse
import json
import os
import time
from pathlib import Path

from nnunet_voxshield.cli.common import add_device, cli_errors, protected_id, resolve_device
from nnunet_voxshield.config import ProtectSettings, Schedule

DEMO_ROOT = "voxshield_demo"
DATASETS = {"regions": ("atlas_regions", "build_atlas_dataset"), "tissues": ("mni_tissues", "build_demo_dataset")}


def ensure_nnunet_dirs() -> None:
    """Use the lab's nnUNet_* folders when set; otherwise ./voxshield_demo/nnUNet_* (said on screen)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(name):
            os.environ[name] = str(Path(DEMO_ROOT, name).resolve())
            print(f"voxshield demo: {name} not set, using {os.environ[name]}")
        Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")


@cli_errors
def main(argv=None):
    p = argparse.ArgumentParser(prog="nnUNetv2_voxshield_demo", description=(
        "End-to-end demo on real anatomy shipped inside installed packages: builds Dataset<d>_MNIRegions (six deep "
        "grey-matter structures of the Harvard-Oxford atlas on the MNI152 brain, labels defined by position, random "
        "smooth deformations), runs nnUNetv2_plan_and_preprocess, nnUNetv2_voxshield_protect and "
        "nnUNetv2_voxshield_check, and prints the measured figures."))
    p.add_argument("-d", type=int, default=501, help="dataset id of the demo dataset [501]")
    p.add_argument("--dataset", choices=tuple(DATASETS), default="regions",
                   help="regions: six structures told apart by position (default); tissues: CSF/GM/WM, which two "
                        "intensity thresholds reproduce (the documented negative control)")
    p.add_argument("-o", type=int, default=None, help="dataset id of the protected copy [d + 100]")
    add_device(p)
    p.add_argument("--rounds", type=int, default=8, help="bilevel rounds [8: a short demo; protection needs more]")
    p.add_argument("--probe-iters", type=int, default=0,
                   help="run the fresh-network probe after the last round with this many training iterations "
                        "[0: off, to keep the demo short on a CPU]")
    p.add_argument("--overwrite", action="store_true", help="rebuild the demo dataset and its protected copy")
    a = p.parse_args(argv)
    ensure_nnunet_dirs()
    from importlib import import_module

    from nnunet_voxshield.nnunet.env import plan_and_preprocess
    from nnunet_voxshield.release.check import check
    from nnunet_voxshield.release.protect import protect

    device = resolve_device(a.device)
    t0 = time.time()
    raw = Path(os.environ["nnUNet_raw"])
    existing = list(raw.glob(f"Dataset{a.d:03d}_*"))
    if a.overwrite or not existing:
        module, builder = DATASETS[a.dataset]
        getattr(import_module(f"nnunet_voxshield.demo.{module}"), builder)(raw, dataset_id=a.d, overwrite=a.overwrite)
    print(f"[1/4] dataset ready ({time.time() - t0:.0f} s); nnUNetv2_plan_and_preprocess -d {a.d} -c 3d_fullres")
    plan_and_preprocess(a.d)
    print(f"[2/4] planned and preprocessed ({time.time() - t0:.0f} s); protecting")
    folder = protect(ProtectSettings(dataset=str(a.d), output_id=a.o, device=device,
                                     schedule=Schedule(rounds=a.rounds), overwrite=a.overwrite,
                                     probe_every=a.rounds if a.probe_iters else 0, probe_iters=max(1, a.probe_iters)))
    print(f"[3/4] wrote {folder} ({time.time() - t0:.0f} s); checking")
    res = check(a.d, protected_id(folder))
    print(f"[4/4] checked ({time.time() - t0:.0f} s)")
    print("\n".join(res.lines))
    report = json.loads((folder / "voxshield.json").read_text())
    last = report["history"][-1] if report["history"] else {}
    print(f"surrogate cross-entropy on x+delta / on clean x after {len(report['history'])} rounds: "
          f"{last.get('ce_perturbed', float('nan')):.4f} / {last.get('ce_clean', float('nan')):.4f} "
          f"(ratio {last.get('ratio', float('nan')):.3f})")
    probe = report.get("probe")
    if probe and probe["probe_ratio"] is not None:
        print(f"fresh-network probe ({probe['probe_iterations']} iterations): Dice on clean held-out cases "
              f"{probe['probe_dice_clean_heldout']:.3f} trained on x+delta vs {probe['probe_dice_clean_trained']:.3f} "
              f"trained on clean x (ratio {probe['probe_ratio']:.2f})")
    print(f"PSNR min {report['summary']['min_psnr_db']:.1f} dB, SSIM min {report['summary']['min_ssim']:.4f}; "
          f"preview: {folder / 'voxshield_preview.png'}; total {time.time() - t0:.0f} s")
    if res.violations:
        print("FAILED:\n" + "\n".join(f"  - {v}" for v in res.violations))
        return 1
    print("OK: all promises hold. Next: nnUNetv2_voxshield_evaluate -d "
          f"{a.d} -pd {protected_id(folder)} -device {device} to measure unlearnability")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
