"""How much of the segmentation is a plain intensity rule, and does a protected training set still teach that rule?

Why: unlearnable examples work when the network prefers the planted shortcut to the real features. If the labels are
mostly a threshold on intensity, the real feature is as easy as any shortcut, and a victim that learns the rule from
protected images segments clean scans anyway. This script measures that directly, with no network at all:

1. Inside each case's nonzero (brain) mask, z-score the image with the case's own mean and std.
2. On a training set (clean or protected), search the ordered rule "label = k where z lies in k's interval"
   (foreground labels ordered by their mean z, intervals in that order, not overlapping) for the intervals with the
   best mean Dice over the foreground labels. Outside the mask the rule says background. When the source's
   background is (almost) all outside the mask, as in the tissue demo, the intervals tile the z axis: K - 1
   thresholds, "CSF < t1 <= GM < t2 <= WM". When background also lies inside the mask (e.g. the atlas regions
   dataset, whose labels are nuclei inside the brain), gaps between the intervals are background.
3. Apply that rule to the clean held-out cases (imagesTs/labelsTs of the source) and report their Dice.

Two references for the same held-out cases:
- best single interval per label: each label's own best interval, fitted alone (intervals may overlap, so this is
  no segmentation, but an upper bound for every rule that gives each label one z interval);
- position only, no intensity (when all cases share one grid): the per-voxel majority label of the source's clean
  training cases.

The search runs on a histogram (bins of 0.02 z) by dynamic programming over the interval bounds (exact: the mean
Dice is a sum of one term per interval); the reported Dice are computed voxel by voxel at the chosen bounds.
Single-channel datasets only (the demo's T1).

    python benchmarks/intensity_rule.py -d 501 -pd 609 608 --out benchmarks/results
"""
import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnunet_voxshield.errors import VoxShieldError  # noqa: E402
from nnunet_voxshield.nnunet.env import dataset_name, require_env  # noqa: E402

BIN = 0.02
Z_RANGE = (-4.0, 4.0)
BACKGROUND_IN_MASK = 0.01  # fraction of the masked voxels above which gaps between intervals are background


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


def background_in_mask(cases) -> bool:
    """Whether background (label 0) covers more than BACKGROUND_IN_MASK of the masked voxels."""
    inside = np.concatenate([c[1][~np.isnan(c[0])] for c in cases])
    return bool(np.mean(inside == 0) > BACKGROUND_IN_MASK)


def _interval_dice(cases, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and D[i, a, b]: pooled Dice of "labels[i] where edges[a] <= z < edges[b]" (a < b; else -inf).

    The first and last bins take everything below and above Z_RANGE.
    """
    z = np.concatenate([c[0][~np.isnan(c[0])] for c in cases])
    y = np.concatenate([c[1][~np.isnan(c[0])] for c in cases])
    edges = np.arange(Z_RANGE[0], Z_RANGE[1] + BIN, BIN)
    classes = [*labels, *([0] if (y == 0).any() and 0 not in labels else [])]
    counts = np.stack([np.histogram(np.clip(z[y == k], *Z_RANGE), edges)[0] for k in classes])  # [classes, bins]
    cum = np.concatenate([np.zeros((len(classes), 1)), np.cumsum(counts, 1)], 1)  # voxels of k below each edge
    everything = cum.sum(0)
    predicted = everything[None, :] - everything[:, None]  # [a, b]: voxels with a <= bin < b
    valid = np.triu(np.ones_like(predicted, dtype=bool), 1)
    dice = np.full((len(labels), *predicted.shape), -np.inf)
    for i in range(len(labels)):
        hits = cum[i][None, :] - cum[i][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            dice[i][valid] = np.nan_to_num(2 * hits / (predicted + counts[i].sum()))[valid]
    return edges, dice


def _bounds_to_z(edges: np.ndarray, a: int, b: int) -> tuple[float, float]:
    return (-np.inf if a == 0 else float(edges[a])), (np.inf if b == len(edges) - 1 else float(edges[b]))


def fit(cases, labels: list[int], gaps: bool = False) -> tuple[list[int], np.ndarray]:
    """Label order (by mean z) and the z intervals [lo, hi) (one row per label, in that order) of the best mean Dice.

    Without `gaps` the intervals tile the z axis (their inner bounds are the K - 1 thresholds); with `gaps`, z between
    them is background.
    """
    z = np.concatenate([c[0][~np.isnan(c[0])] for c in cases])
    y = np.concatenate([c[1][~np.isnan(c[0])] for c in cases])
    order = sorted(labels, key=lambda k: z[y == k].mean())
    edges, dice = _interval_dice(cases, order)
    n_edges, last = len(edges), len(edges) - 1
    # best[i][a]: the best sum of Dice for labels i.. when label i starts at edge a (ties: the earliest bounds)
    best, choice = np.full((len(order) + 1, n_edges), -np.inf), np.zeros((len(order), n_edges), dtype=int)
    best[len(order)] = 0.0 if gaps else np.where(np.arange(n_edges) == last, 0.0, -np.inf)
    for i in reversed(range(len(order))):
        rest = best[i + 1]
        if gaps:  # the next label may start at any edge from here on: the best start at or after each edge
            rest = np.maximum.accumulate(rest[::-1])[::-1]
        total = dice[i] + rest[None, :]
        choice[i] = total.argmax(1)
        best[i] = total.max(1)
    starts = [int(np.argmax(best[0]))] if gaps else [0]
    intervals = []
    for i in range(len(order)):
        end = choice[i][starts[-1]]
        intervals.append(_bounds_to_z(edges, starts[-1], end))
        if i + 1 < len(order):
            starts.append(int(end + np.argmax(best[i + 1][end:])) if gaps else int(end))
    return order, np.array(intervals)


def fit_intervals(cases, labels: list[int]) -> np.ndarray:
    """Each label's own best z interval [lo, hi), fitted alone (rows in the order of `labels`; they may overlap)."""
    edges, dice = _interval_dice(cases, labels)
    return np.array([_bounds_to_z(edges, *np.unravel_index(np.argmax(d), d.shape)) for d in dice])


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else 1.0


def score(cases, order: list[int], intervals: np.ndarray, overlapping: bool = False) -> dict[int, float]:
    """Mean Dice per label over cases of the interval rule (voxel by voxel, background outside the mask).

    `overlapping`: score each label's interval on its own (for fit_intervals).
    """
    per_case = []
    for z, y in cases:
        hit = {k: (z >= lo) & (z < hi) for k, (lo, hi) in zip(order, intervals)}  # NaN (outside the mask): False
        if not overlapping:
            pred = np.zeros_like(y)
            for k in order:
                pred[hit[k]] = k
            hit = {k: pred == k for k in order}
        per_case.append({k: _dice(hit[k], y == k) for k in order})
    return {k: float(np.mean([d[k] for d in per_case])) for k in order}


def position_rule(train, test, labels: list[int]) -> dict[int, float] | None:
    """Mean Dice per label on `test` of the per-voxel majority label of `train`; None unless all share one shape."""
    if len({y.shape for _, y in train + test}) != 1:
        return None
    votes = np.stack([sum((y == k).astype(np.int32) for _, y in train) for k in [0, *labels]])
    pred = np.asarray([0, *labels])[votes.argmax(0)]
    return {k: float(np.mean([_dice(pred == k, y == k) for _, y in test])) for k in labels}


def _format_intervals(order, intervals, names) -> str:
    """"name lo..hi" per label in z order, for the markdown table (the thresholds alone when the intervals tile z)."""
    if np.isinf(intervals[0, 0]) and np.isinf(intervals[-1, 1]) and np.array_equal(intervals[1:, 0], intervals[:-1, 1]):
        return ", ".join(f"{v:.2f}" for v in np.round(intervals[1:, 0], 3))
    text = {-np.inf: "-inf", np.inf: "inf"}
    return ", ".join(f"{names[k]} {text.get(lo, f'{lo:.2f}')}..{text.get(hi, f'{hi:.2f}')}"
                     for k, (lo, hi) in zip(order, intervals))


def _json_intervals(order, intervals, names) -> dict[str, list]:
    return {names[k]: [None if np.isinf(v) else round(float(v), 3) for v in bounds]
            for k, bounds in zip(order, intervals)}


def _mean(dice: dict) -> float:
    return float(np.mean(list(dice.values())))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="source dataset (id or name) with imagesTs/labelsTs")
    p.add_argument("-pd", nargs="*", default=[], help="protected datasets whose training images to fit the rule on")
    p.add_argument("--out", default=None, help="folder for intensity_rule.{json,md}")
    a = p.parse_args(argv)
    from nnunet_voxshield.evaluation.evaluate import labelled_test_set, training_cases  # torch: only when run

    raw = require_env("nnUNet_raw")["nnUNet_raw"]
    source = dataset_name(a.d)
    dataset_json = load_json(raw / source / "dataset.json")
    if len(dataset_json["channel_names"]) != 1:
        sys.exit(f"{source}: {len(dataset_json['channel_names'])} channels; this diagnostic handles one channel only")
    labels = sorted(v for v in dataset_json["labels"].values() if isinstance(v, int) and v > 0)
    names = {v: k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    heldout = labelled_test_set(source, dataset_json)
    test = load_cases([(heldout.images[c], heldout.labels[c]) for c in sorted(heldout.labels)], dataset_json)
    rows, shown, gaps, position = [], [], None, None
    for name in [a.d, *a.pd]:
        folder = dataset_name(name)
        own_json = load_json(raw / folder / "dataset.json")
        files = training_cases(folder, own_json)
        train = load_cases([(f["images"], f["label"]) for _, f in sorted(files.items())], own_json)
        if gaps is None:  # the source's clean training set decides the rule's form and the position reference
            gaps, position = background_in_mask(train), position_rule(train, test, labels)
        order, intervals = fit(train, labels, gaps)
        alone = fit_intervals(train, labels)
        thresholds = intervals[1:, 0] if not gaps else intervals[np.isfinite(intervals)]
        rows.append({"fit_on": folder, "thresholds_z": [round(float(v), 3) for v in thresholds],
                     "intervals_z": _json_intervals(order, intervals, names),
                     "train_dice": score(train, order, intervals), "clean_test_dice": score(test, order, intervals),
                     "single_interval_bound": {
                         "intervals_z": _json_intervals(labels, alone, names),
                         "train_dice": score(train, labels, alone, overlapping=True),
                         "clean_test_dice": score(test, labels, alone, overlapping=True)}})
        shown.append(_format_intervals(order, intervals, names))
    result = {"command": "python benchmarks/intensity_rule.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "test_set": f"{source} imagesTs",
              "gaps_are_background": gaps, "position_only_clean_test_dice": position, "rows": rows}
    md = ["# Intensity-threshold rule: training set -> clean held-out Dice", "",
          f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
          f"Held-out: {len(test)} clean cases of {result['test_set']}", ""]
    if gaps:
        md += ["Background also lies inside the brain mask: each label gets one z interval (ordered, not overlapping),",
               "and z outside every interval is background.", ""]
    md += ["| rule fit on | " + ("intervals (z)" if gaps else "thresholds (z)") +
           " | mean Dice on its training images | " +
           " | ".join(f"{names[k]} (clean test)" for k in labels) + " | mean (clean test) |",
           "|---|---|---:|" + "---:|" * (len(labels) + 1)]
    for r, bounds in zip(rows, shown):
        md.append(f"| {r['fit_on']} | {bounds} | {_mean(r['train_dice']):.3f} | " +
                  " | ".join(f"{r['clean_test_dice'][k]:.3f}" for k in labels) +
                  f" | **{_mean(r['clean_test_dice']):.3f}** |")
    md += ["", "References on the same held-out cases:", "",
           "| reference | " + " | ".join(names[k] for k in labels) + " | mean |", "|---|" + "---:|" * (len(labels) + 1)]
    for r in rows:
        bound = r["single_interval_bound"]["clean_test_dice"]
        md.append(f"| best single interval per label, each fitted alone on {r['fit_on']} (upper bound) | " +
                  " | ".join(f"{bound[k]:.3f}" for k in labels) + f" | {_mean(bound):.3f} |")
    if position is not None:
        md.append(f"| position only: per-voxel majority label of the clean training cases of {source} | " +
                  " | ".join(f"{position[k]:.3f}" for k in labels) + f" | {_mean(position):.3f} |")
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
