"""How much of the segmentation is a plain intensity rule, and does a protected training set still teach that rule?

Why: unlearnable examples work when the network prefers the planted shortcut to the real features. If the labels are
mostly a threshold on intensity, the real feature is as easy as any shortcut, and a victim that learns the rule from
protected images segments clean scans anyway. This script measures that directly, with no network at all:

1. Inside each case's nonzero (brain) mask, z-score the image with the case's own mean and std.
2. On a training set (clean or protected), search the rule "label = tissue k where t_(k-1) <= z < t_k" (foreground
   labels ordered by their mean z; background = outside the mask) for the thresholds with the best mean Dice.
3. Apply those thresholds to the clean held-out cases (imagesTs/labelsTs of the source) and report their Dice.

The search runs on a histogram (bins of 0.02 z); the reported Dice are computed voxel by voxel at the chosen
thresholds. Single-channel datasets only (the demo's T1).

    python benchmarks/intensity_rule.py -d 501 -pd 609 608 --out benchmarks/results
"""
import argparse
import itertools
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnunet_voxshield.errors import VoxShieldError  # noqa: E402
from nnunet_voxshield.evaluation import labelled_test_set, training_cases  # noqa: E402
from nnunet_voxshield.nnunet_env import dataset_name, require_env  # noqa: E402

BIN = 0.02
Z_RANGE = (-4.0, 4.0)


def load_cases(pairs: list[tuple[list[str], str]], dataset_json: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(z-scored image inside the nonzero mask, label) per (image files, label file), with the dataset's reader."""
    rw = determine_reader_writer_from_dataset_json(dataset_json, pairs[0][0][0])()
    cases = []
    for image_files, label_file in pairs:
        x = rw.read_images(image_files)[0][0]
        y = rw.read_seg(label_file)[0][0].astype(np.int64)
        mask = x != 0
        z = np.where(mask, (x - x[mask].mean()) / x[mask].std(), np.nan)
        cases.append((z, y))
    return cases


def fit(cases, labels: list[int]) -> tuple[list[int], np.ndarray]:
    """Tissue order (by mean z) and the thresholds with the best mean Dice over `labels` on these cases."""
    z = np.concatenate([c[0][~np.isnan(c[0])] for c in cases])
    y = np.concatenate([c[1][~np.isnan(c[0])] for c in cases])
    order = sorted(labels, key=lambda k: z[y == k].mean())
    edges = np.arange(Z_RANGE[0], Z_RANGE[1] + BIN, BIN)
    counts = np.stack([np.histogram(np.clip(z[y == k], *Z_RANGE), edges)[0] for k in order])  # [K, bins]
    cum = np.concatenate([np.zeros((len(order), 1)), np.cumsum(counts, 1)], 1)  # voxels of k below each edge
    totals = counts.sum(1)
    best, best_t = -1.0, None
    for cut in itertools.combinations(range(1, len(edges) - 1), len(order) - 1):
        bounds = (0, *cut, len(edges) - 1)
        dice = []
        for k in range(len(order)):
            inside = cum[:, bounds[k + 1]] - cum[:, bounds[k]]  # voxels of every tissue predicted as tissue k
            dice.append(2 * inside[k] / (inside.sum() + totals[k]))
        if np.mean(dice) > best:
            best, best_t = float(np.mean(dice)), edges[list(cut)]
    return order, best_t


def score(cases, order: list[int], thresholds: np.ndarray) -> dict[int, float]:
    """Mean Dice per label over cases of the threshold rule (voxel by voxel, background outside the mask)."""
    per_case = []
    for z, y in cases:
        pred = np.zeros_like(y)
        inside = ~np.isnan(z)
        pred[inside] = np.asarray(order)[np.searchsorted(thresholds, z[inside], side="right")]
        per_case.append({k: 2 * ((pred == k) & (y == k)).sum() / ((pred == k).sum() + (y == k).sum()) for k in order})
    return {k: float(np.mean([d[k] for d in per_case])) for k in order}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="source dataset (id or name) with imagesTs/labelsTs")
    p.add_argument("-pd", nargs="*", default=[], help="protected datasets whose training images to fit the rule on")
    p.add_argument("--out", default=None, help="folder for intensity_rule.{json,md}")
    a = p.parse_args(argv)
    raw = require_env("nnUNet_raw")["nnUNet_raw"]
    source = dataset_name(a.d)
    dataset_json = load_json(raw / source / "dataset.json")
    if len(dataset_json["channel_names"]) != 1:
        sys.exit(f"{source}: {len(dataset_json['channel_names'])} channels; this diagnostic handles one channel only")
    labels = sorted(v for v in dataset_json["labels"].values() if isinstance(v, int) and v > 0)
    names = {v: k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    heldout = labelled_test_set(source, dataset_json)
    test = load_cases([(heldout.images[c], heldout.labels[c]) for c in sorted(heldout.labels)], dataset_json)
    rows = []
    for name in [a.d, *a.pd]:
        folder = dataset_name(name)
        own_json = load_json(raw / folder / "dataset.json")
        files = training_cases(folder, own_json)
        train = load_cases([(f["images"], f["label"]) for _, f in sorted(files.items())], own_json)
        order, t = fit(train, labels)
        rows.append({"fit_on": folder, "thresholds_z": [round(float(v), 3) for v in t],
                     "train_dice": score(train, order, t), "clean_test_dice": score(test, order, t)})
    result = {"command": "python benchmarks/intensity_rule.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "test_set": f"{source} imagesTs",
              "rows": rows}
    md = ["# Intensity-threshold rule: training set -> clean held-out Dice", "",
          f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
          f"Held-out: {len(test)} clean cases of {result['test_set']}", "",
          "| rule fit on | thresholds (z) | mean Dice on its training images | " +
          " | ".join(f"{names[k]} (clean test)" for k in labels) + " | mean (clean test) |",
          "|---|---|---:|" + "---:|" * (len(labels) + 1)]
    for r in rows:
        md.append(f"| {r['fit_on']} | {', '.join(f'{v:.2f}' for v in r['thresholds_z'])} | "
                  f"{np.mean(list(r['train_dice'].values())):.3f} | " +
                  " | ".join(f"{r['clean_test_dice'][k]:.3f}" for k in labels) +
                  f" | **{np.mean(list(r['clean_test_dice'].values())):.3f}** |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "intensity_rule.json").write_text(json.dumps(result, indent=2, default=float))
        (Path(a.out) / "intensity_rule.md").write_text(text)


if __name__ == "__main__":
    try:
        main()
    except VoxShieldError as e:
        sys.exit(f"intensity_rule.py: {e}")
