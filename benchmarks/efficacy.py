"""Efficacy benchmark: does stock nnU-Net trained on protected data fail on clean scans?

On the demo dataset (MNI152 brain, CSF/GM/WM), this protects the training set once per variant (VoxShield at the
default budget; uniform noise of the same budget as the baseline) and trains the same victim on clean and on each
protected copy with `nnUNetv2_voxshield_evaluate`, scoring Dice on the clean held-out cases (imagesTs/labelsTs).
Results go to benchmarks/results/efficacy_<tag>.{json,md,png} with command, machine and date.

    python benchmarks/efficacy.py --device cpu --victims nnUNetTrainerVS_Bench --seeds 1
"""
import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHORT = {"rounds": 8, "noise_steps": 2}  # the budget curve's schedule
VARIANTS = {"voxshield": {}, "random": {"method": "random"}, "classwise": {"method": "classwise"},
            "voxshield_no_freq": {"lambda_z": 0.0}, "error_min_only": {"lambda_z": 0.0, "lambda_s": 0.0},
            "voxshield_roi_all": {"roi": "all"},
            "voxshield_4steps": {"schedule": {"rounds": 10, "noise_steps": 4}},  # 4x the noise steps per round
            "voxshield_eps16": {"eps": 16 / 255, "schedule": SHORT},  # diagnostic: 4x budget
            "voxshield_30rounds": {"schedule": {"rounds": 30}},  # the shipped default schedule
            "voxshield_eps8": {"eps": 8 / 255, "schedule": SHORT},
            "voxshield_eps32": {"eps": 32 / 255, "schedule": SHORT},
            "voxshield_eps2": {"eps": 2 / 255, "schedule": SHORT},
            "voxshield_no_sem": {"lambda_s": 0.0}}


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--victims", nargs="+", default=["nnUNetTrainerVS_Bench"])
    p.add_argument("--variants", nargs="+", default=["voxshield", "random"], choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20, help="bilevel rounds of each protection")
    p.add_argument("-d", type=int, default=501, help="demo dataset id; variant k of VARIANTS gets id d + 100 + k")
    p.add_argument("--work", default=str(HERE / "work"), help="nnUNet_* folders when not set in the environment")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(name, str(Path(a.work) / name))
        Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")

    from nnunet_voxshield.config import Schedule
    from nnunet_voxshield.demo.mni_tissues import build_demo_dataset
    from nnunet_voxshield.evaluation.evaluate import evaluate
    from nnunet_voxshield.nnunet.env import plan_and_preprocess
    from nnunet_voxshield.release.protect import ProtectSettings, protect

    raw = Path(os.environ["nnUNet_raw"])
    if not list(raw.glob(f"Dataset{a.d:03d}_*")):
        build_demo_dataset(raw, dataset_id=a.d)
        plan_and_preprocess(a.d)
    rows, t_start = [], time.time()
    for variant in a.variants:
        out_id = a.d + 100 + list(VARIANTS).index(variant)  # stable per variant, so reruns reuse finished work
        existing = list(raw.glob(f"Dataset{out_id:03d}_*"))
        t0 = time.time()
        settings = dict(VARIANTS[variant])
        schedule = Schedule(**{"rounds": a.rounds, **settings.pop("schedule", {})})
        folder = existing[0] if existing else protect(ProtectSettings(
            dataset=str(a.d), output_id=out_id, device=a.device, schedule=schedule, overwrite=True, **settings))
        protect_s = time.time() - t0
        report = json.loads((folder / "voxshield.json").read_text())
        ev = evaluate(a.d, out_id, trainers=a.victims, fold="all", seeds=a.seeds, device=a.device)
        for v in ev["victims"]:
            rows.append({"variant": variant, "protected_dataset": folder.name,
                         "protect_wall_s": round(protect_s) if not existing else None,
                         "rounds": len(report["history"]),
                         "min_psnr_db": report["summary"]["min_psnr_db"],
                         "surrogate_ce_ratio": report["history"][-1]["ratio"] if report["history"] else None,
                         "victim": v["victim"], "schedule": v["schedule"], "clean": v["labels"]["mean"]["clean"],
                         "protected": v["labels"]["mean"]["protected"], "ratio": v["labels"]["mean"]["ratio"],
                         "per_label": v["labels"]})
    tag = a.tag or datetime.now(timezone.utc).strftime("%Y%m%d")
    result = {"command": "python benchmarks/efficacy.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                           else argv)),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "wall_s": round(time.time() - t_start), "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"efficacy_{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"efficacy_{tag}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"# Efficacy on the demo dataset ({result['date'][:10]})", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Wall time: {result['wall_s']} s", "",
             "| variant | victim | clean-trained mean Dice | protected-trained mean Dice | ratio | min PSNR (dB) | "
             "surrogate CE ratio |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['victim']} | {_fmt(r.get('clean'))} | "
                     f"{_fmt(r.get('protected'))} | {_num(r.get('ratio'))} | {_num(r.get('min_psnr_db'))} | "
                     f"{_num(r.get('surrogate_ce_ratio'))} |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _fmt(stats) -> str:
    if not isinstance(stats, dict) or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.3f}" + (f" +- {stats['std']:.3f}" if stats.get("std") is not None else "")


if __name__ == "__main__":
    main()
