"""How much of a victim's segmentation the planted perturbation explains on its own.

Unlearnable examples work when the perturbation alone explains the labels, so that training has nothing left to learn
from the anatomy. This script asks a victim trained on a protected set (fold 0) to segment its own training cases
from three inputs, on nnU-Net's preprocessed grid with nnU-Net's sliding window (no mirroring):

- protected: the preprocessed protected images it was trained on;
- clean: the same cases' clean preprocessed images (what the victim would meet in use);
- perturbation alone: protected minus clean preprocessed image, i.e. the perturbation (in normalised units) on a
  blank image: nothing of the anatomy is left (up to the protected case's slightly different z-scoring).

High Dice from the perturbation alone means the victim reads the labels off the code; low Dice means it leans on
the anatomy even where the code is present. On the clean image the script also says how the victim errs, as shares
of the labelled voxels: labelled voxels called background ("missed": a code acting as a gate that stays shut without
it), labelled voxels given another label, and background voxels called foreground; and its Dice per label.

With `-net source` the network is instead fold 0 trained on the clean source, the network `--method targeted`
attacks: its Dice on the protected images says whether the attack succeeded before any victim is trained on them,
and each input is also scored against the labels the attack aims at (the cyclic shift of the labels).

    python benchmarks/code_reliance.py -d 502 -pd 613 619 -tr nnUNetTrainerVS_Short --out results/code_reliance.json
"""
import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnunet_voxshield.nnunet.env import dataset_name, require_env  # noqa: E402

INPUTS = ("protected", "clean", "perturbation alone")


def reliance_inputs(clean_set, protected_set, cases: list[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Each of INPUTS as (data [C, ...], seg [1, ...]) per case, from two nnU-Net preprocessed datasets."""
    inputs = {name: [] for name in INPUTS}
    for case in cases:
        x_clean, seg = (np.asarray(a) for a in clean_set.load_case(case)[:2])
        x_protected, seg_protected = (np.asarray(a) for a in protected_set.load_case(case)[:2])
        if not np.array_equal(seg, seg_protected):
            sys.exit(f"{case}: the label maps of the clean and the protected set differ on the preprocessed grid")
        perturbation = np.where(seg >= 0, x_protected - x_clean, 0)  # nothing outside nnU-Net's nonzero region
        for name, x in zip(INPUTS, (x_protected, x_clean, perturbation)):
            inputs[name].append((x, seg))
    return inputs


def clean_errors(predictions: list[np.ndarray], references: list[np.ndarray], per_case: list[dict]) -> dict:
    """How a victim errs, pooled over cases: shares of the labelled voxels that it calls background ("missed"), that
    it gives another label, and background voxels it calls foreground; and the mean Dice per label (`per_case`: the
    cases' `dice_per_label`)."""
    counts = {"missed": 0, "other label": 0, "false foreground": 0}
    labelled = 0
    for prediction, reference in zip(predictions, references):
        inside = reference > 0
        labelled += int(inside.sum())
        counts["missed"] += int((inside & (prediction == 0)).sum())
        counts["other label"] += int((inside & (prediction > 0) & (prediction != reference)).sum())
        counts["false foreground"] += int(((reference == 0) & (prediction > 0)).sum())
    per_label = {label: [case[label] for case in per_case if case[label] is not None] for label in per_case[0]}
    return {**{k: v / max(labelled, 1) for k, v in counts.items()},
            "dice per label": {str(k): float(np.mean(v)) if v else None for k, v in per_label.items()}}


def reliance(source: str, protected: str, trainer: str, checkpoint: str, device, network: str = "victim") -> dict:
    """Mean Dice of a fold-0 network (the victim trained on `protected`, or with network="source" the one trained
    on the clean source) on the protected set's training cases (listed) from each of INPUTS, and its errors on the
    clean images; for the source network also each input's Dice against the targeted attack's labels."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    import torch
    from nnunet_voxshield.method.objectives import cyclic_shift, permute_labels
    from nnunet_voxshield.nnunet.scoring import dice_per_label, mean_dice, predict_cases
    from nnunet_voxshield.nnunet.source import load_source
    results = require_env("nnUNet_results")["nnUNet_results"]
    folder = results / (protected if network == "victim" else source) / f"{trainer}__nnUNetPlans__3d_fullres"
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=device, verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name=checkpoint)
    splits = json.loads((require_env("nnUNet_preprocessed")["nnUNet_preprocessed"] / protected /
                         "splits_final.json").read_text())
    train = sorted(splits[0]["train"])
    inputs = reliance_inputs(load_source(source).preprocessed_dataset(train),
                             load_source(protected).preprocessed_dataset(train), train)
    labels = predictor.label_manager.foreground_labels
    target = cyclic_shift(len(labels)) if network == "source" else None
    out = {"cases": train}
    for name, cases in inputs.items():
        predictions, references = predict_cases(predictor, cases), [np.asarray(seg)[0] for _, seg in cases]
        per_case = [dice_per_label(p, r, labels) for p, r in zip(predictions, references)]
        out[name] = mean_dice(per_case)
        if target is not None:
            targets = [permute_labels(torch.from_numpy(r), target).numpy() for r in references]
            out[f"{name} vs target"] = mean_dice([dice_per_label(p, t, labels) for p, t in zip(predictions, targets)])
        if name == "clean":
            out["clean errors"] = clean_errors(predictions, references, per_case)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="clean source dataset (id or name), preprocessed")
    p.add_argument("-pd", nargs="+", required=True,
                   help="protected datasets, each with a trained fold-0 victim unless -net source")
    p.add_argument("-tr", default="nnUNetTrainerVS_Short", help="the victims' trainer [nnUNetTrainerVS_Short]")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name [checkpoint_final.pth]")
    p.add_argument("-net", choices=("victim", "source"), default="victim",
                   help="whose fold-0 network reads the inputs: the victim trained on each protected set, or the "
                        "network trained on the clean source (a targeted attack's success) [victim]")
    p.add_argument("--out", default=None, help="json file for the results")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(int(os.environ.get("nnUNet_def_n_proc", 2)))
    source = dataset_name(a.d)
    rows = {}
    for pd in a.pd:
        protected = dataset_name(pd)
        rows[protected] = reliance(source, protected, a.tr, a.chk, torch.device("cpu"), a.net)
        errors = rows[protected]["clean errors"]
        print(f"{protected}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[protected].items()
                                             if isinstance(v, float)) + "; on the clean image "
              + ", ".join(f"{k} {errors[k]:.3f}" for k in ("missed", "other label", "false foreground")), flush=True)
    result = {"command": "python benchmarks/code_reliance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "source": source, "trainer": a.tr, "checkpoint": a.chk, "network": a.net,
              "victims": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
