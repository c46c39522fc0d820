"""How strongly each label's own edge stands out, beside the code planted on it.

A gating code is shut on clean scans when, without the code, a victim finds nothing it trusts as foreground. A label
whose border is a strong edge of its own (a structure beside the dark ventricles, say) gives the victim that evidence
whatever the code does. This script measures, on nnU-Net's preprocessed clean training cases (normalised units, all
channels averaged), per label: its size, the mean gradient magnitude on its border voxels and inside it, the share of
its 2-voxel outer rim darker than -1.5 (cerebrospinal fluid on a z-scored T1), and, given protected copies, the mean
absolute perturbation on its border voxels, so that edge and code compare on one scale.

    python benchmarks/label_edges.py -d 502 -pd 624 --out results/label_edges_502_20261202.json
"""
import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnunet_voxshield.nnunet.env import dataset_name  # noqa: E402

DARK = -1.5
"""Normalised intensity below which a rim voxel counts as dark (CSF on a z-scored T1 brain)."""


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """Mean over channels of the central-difference gradient's length, in normalised units per voxel."""
    return np.mean([np.sqrt(sum(np.square(g) for g in np.gradient(channel))) for channel in image], axis=0)


def label_edges(cases: list[tuple[np.ndarray, np.ndarray]], labels: list[int],
                perturbations: list[np.ndarray] | None = None) -> dict[int, dict]:
    """Per label, averaged over the cases that contain it: voxels, border and interior gradient, dark rim share, and
    (with `perturbations`, one [C, ...] array per case) the mean absolute perturbation on the border."""
    rows = {label: [] for label in labels}
    for i, (image, seg) in enumerate(cases):
        seg = seg[0]
        gradient = gradient_magnitude(image)
        for label in labels:
            inside = seg == label
            if not inside.any():
                continue
            border = inside & ~ndimage.binary_erosion(inside)
            interior = inside & ~border
            rim = ndimage.binary_dilation(inside, iterations=2) & ~inside
            row = {"voxels": int(inside.sum()), "border gradient": float(gradient[border].mean()),
                   "interior gradient": float(gradient[interior].mean()) if interior.any() else None,
                   "dark rim share": float((image.mean(axis=0)[rim] < DARK).mean())}
            if perturbations is not None:
                row["border perturbation"] = float(np.abs(perturbations[i]).mean(axis=0)[border].mean())
            rows[label].append(row)
    return {label: {key: float(np.mean([r[key] for r in found if r[key] is not None]))
                    for key in found[0]} for label, found in rows.items() if found}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="clean source dataset (id or name), preprocessed 3d_fullres")
    p.add_argument("-pd", nargs="*", default=[], help="protected copies, preprocessed: adds their border perturbation")
    p.add_argument("--out", default=None, help="json file for the results")
    a = p.parse_args(argv)
    from nnunet_voxshield.nnunet.source import load_source
    source = load_source(dataset_name(a.d))
    names = {v: k for k, v in source.dataset_json["labels"].items() if isinstance(v, int) and v > 0}
    cases = source.identifiers
    clean_set = source.preprocessed_dataset(cases)
    clean = [tuple(np.asarray(x) for x in clean_set.load_case(c)[:2]) for c in cases]
    result = {"command": "python benchmarks/label_edges.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "source": source.name, "dark below": DARK, "labels": {}}
    per_set = {"clean": label_edges(clean, sorted(names))}
    for pd in a.pd:
        protected_set = load_source(dataset_name(pd)).preprocessed_dataset(cases)
        deltas = [np.asarray(protected_set.load_case(c)[0]) - x for c, (x, _) in zip(cases, clean)]
        per_set[dataset_name(pd)] = label_edges(clean, sorted(names), deltas)
    for label, name in sorted(names.items()):
        row = dict(per_set["clean"][label])
        for pd in per_set:
            if pd != "clean":
                row[f"border perturbation, {pd}"] = per_set[pd][label]["border perturbation"]
        result["labels"][name] = row
        print(f"{name:12s} " + ", ".join(f"{k} {v:.2f}" if k != "voxels" else f"{k} {v:.0f}" for k, v in row.items()))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
