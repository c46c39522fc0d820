"""How much of each protection survives each of nnU-Net's training transforms, as a correlation.

For every protected dataset given, the perturbation a victim sees is measured the way a victim gets it: nnU-Net's own
preprocessing of the protected files minus that of the clean files (d). Each transform T of stock nnU-Net's training
pipeline (`nnUNetTrainer.get_training_transforms`) is then applied alone, with its probability forced to 1, to x + d
and to x with the same random draw; survival is the correlation, over foreground voxels, between T(x + d) - T(x) and
the code as it should read there: for intensity steps d itself; for spatial steps (rotation, scaling, mirroring) the
method's own code drawn afresh, in its canonical orientation and scale, on the transformed labels, at the best of 8
phases for each label and each layer of the code (a convolutional victim does not care where a grating's stripes start, only about its
direction and period), averaged over the labels by voxel count.
So a grating that rotation turns into another direction, or scaling into another period, scores low: a filter tuned
to the code would miss it. "stock pipeline" applies the whole pipeline with nnU-Net's probabilities. Only label
codes (codes, presence, parity) have a canonical form to compare with; for other methods spatial steps are not scored.
`--attacks` adds the adaptive attackers' own transforms (by their trainer names, nnUNetTrainerVS_<name>), which keep
voxels in place: for those and every intensity step, "amplitude" is also recorded, the root mean square of
T(x + d) - T(x) over that of d on the foreground, since a filter that keeps a code's shape but not its strength (a blur
on a grating) shows a high correlation and a low amplitude.

    python benchmarks/code_survival.py -d 502 -pd 602 603 --draws 16
    python benchmarks/code_survival.py -d 502 -pd 624 --attacks ISS Blur3D Median LowPassZ --draws 4
"""
import argparse
import itertools
import json
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROTATION = (-np.pi / 6, np.pi / 6)  # nnU-Net's rotation range for isotropic 3d_fullres patches
MIRROR_AXES = (0, 1, 2)

def transforms(trainer_cls, patch_size, rotation, mirror_axes):
    """(name, transform with probability 1) for each step of stock nnU-Net's pipeline, plus the whole pipeline."""
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    pipeline = trainer_cls.get_training_transforms(patch_size, rotation, None, mirror_axes, False)
    steps = []
    for t in pipeline.transforms:
        if isinstance(t, SpatialTransform):
            for kind in ("rotation", "scaling"):
                forced = SpatialTransform(patch_size, 0, False, p_elastic_deform=0, p_rotation=float(kind == "rotation"),
                                          rotation=rotation, p_scaling=float(kind == "scaling"), scaling=(0.7, 1.4),
                                          p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                                          border_mode_seg="constant", padding_value_seg=-1)
                steps.append((kind, forced, True))
        elif isinstance(t, RandomTransform):
            inner = t.transform
            name = type(inner).__name__.replace("Transform", "")
            if name == "Gamma":
                name += " (inverted)" if inner.p_invert_image else ""
            steps.append((name, RandomTransform(inner, apply_probability=1.0), False))
        elif type(t).__name__ == "MirrorTransform":
            steps.append(("Mirror", t, True))
    return steps + [("stock pipeline", pipeline, None)]


def attacks(names: list[str]) -> list:
    """(name, transform, False) for each named adaptive attacker: the attack its trainer runs on every sample."""
    from nnunet_voxshield_trainers.nnUNetTrainerVoxShieldVictims import VICTIMS
    attackers = {n: cls for n, (cls, _) in VICTIMS.items() if hasattr(cls, "attack")}
    unknown = [n for n in names if n not in attackers]
    if unknown:
        raise SystemExit(f"no attacker named {unknown}; choose from {list(attackers)}")
    # an attack reads only its class's settings, so it is built without the trainer's own set-up
    return [(f"attack {n}", object.__new__(attackers[n]).attack(), False) for n in names]


def _apply(transform, image, seg, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    out = transform(image=image.clone(), segmentation=seg.clone())
    return out["image"], out["segmentation"]


def survival(transform, spatial, x, d, seg, seed, code) -> tuple[float, float]:
    """(corr over foreground of T(x + d) - T(x) with the code as it should read after T, see the module docstring;
    its amplitude relative to d's where T keeps voxels in place, else nan). `code(labels)` draws the method's
    canonical code on a label map at each candidate phase, or is None."""
    adv, seg_t = _apply(transform, x + d, seg, seed)
    clean, _ = _apply(transform, x, seg, seed)
    if spatial is False:
        where = seg_t[0] > 0
        return _corr(adv - clean, d, where), float((adv - clean)[:, where].norm() / d[:, where].norm())
    if code is None:
        return float("nan"), float("nan")
    labels = seg_t[0].numpy()
    codes = [torch.from_numpy(c)[None] for c in code(labels)]
    per_label = [(int((seg_t[0] == k).sum()), max(_corr(adv - clean, c, seg_t[0] == k) for c in codes))
                 for k in np.unique(labels) if k > 0]
    return float(sum(n * c for n, c in per_label) / sum(n for n, _ in per_label)), float("nan")


def mean_measured(values: list[float]) -> float | None:
    """Mean over the draws that measured something; None (JSON null) where no draw could, e.g. a spatial step of a
    method without a canonical code."""
    measured = [v for v in values if not np.isnan(v)]
    return float(np.mean(measured)) if measured else None


def _corr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    a, b = a[:, where].double().ravel(), b[:, where].double().ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b / denom) if denom > 0 else float("nan")


def clean_and_protected(src, protected: str, identifier: str, pm, cm) -> tuple:
    """nnU-Net's preprocessing of one training case, clean and from the protected dataset's files: (x, x_p, seg)."""
    from nnunet_voxshield.nnunet.bridge import preprocess_case
    files = src.files[identifier]
    x, seg, _, _ = preprocess_case(files["images"], files["label"], pm, cm, src.dataset_json, identifier)
    protected_files = [str(src.raw.parent / protected / "imagesTr" / Path(f).name) for f in files["images"]]
    return x, preprocess_case(protected_files, files["label"], pm, cm, src.dataset_json, identifier)[0], seg


def shifted_code(layers: list):
    """`code(labels)`: the (weight, gratings) layers drawn on `labels` with their phases moved by each of 8 shifts,
    each layer's shift chosen independently (8 ** layers candidates)."""
    from nnunet_voxshield.method.baselines import layered_code

    def moved(gratings, shift):
        return {k: (d, period, phase + shift) for k, (d, period, phase) in gratings.items()}

    def code(labels):
        return [layered_code(labels, [(w, moved(g, s)) for (w, g), s in zip(layers, shifts)])
                for shifts in itertools.product(np.arange(8) * np.pi / 4, repeat=len(layers))]
    return code


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="clean source dataset")
    p.add_argument("-pd", nargs="+", required=True, help="protected datasets written by nnUNetv2_voxshield_protect")
    p.add_argument("--cases", type=int, default=3, help="training cases per dataset")
    p.add_argument("--draws", type=int, default=16, help="random draws per transform and case")
    p.add_argument("--attacks", nargs="*", default=[], help="adaptive attackers to add, by trainer name (ISS, Blur3D, ...)")
    p.add_argument("--out", default=str(HERE / "results" / "code_survival.json"))
    a = p.parse_args(argv)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_voxshield.method.baselines import GRATING_METHODS, method_gratings
    from nnunet_voxshield.nnunet.env import dataset_name
    from nnunet_voxshield.nnunet.source import load_source

    src = load_source(a.d)
    foreground = src.plans_manager.get_label_manager(src.dataset_json).foreground_labels
    cm, pm = src.configuration_manager, src.plans_manager
    extra = attacks(a.attacks)
    results = {}
    for protected in a.pd:
        name = dataset_name(protected)
        report = json.loads((src.raw.parent / name / "voxshield.json").read_text())
        method = report["settings"]["method"]
        code = None
        if method in GRATING_METHODS:
            code = shifted_code(method_gratings(method, foreground, report["settings"]["seed"]))
        rows = {}
        for case_index, identifier in enumerate(src.identifiers[:a.cases]):
            x, xp, seg = clean_and_protected(src, name, identifier, pm, cm)
            x, d, seg = torch.from_numpy(x).float(), torch.from_numpy(xp - x).float(), torch.from_numpy(seg)
            seg = seg.clamp(min=0).to(torch.int16)
            for t_name, transform, spatial in [*transforms(nnUNetTrainer, tuple(x.shape[1:]), ROTATION, MIRROR_AXES),
                                               *extra]:
                rows.setdefault(t_name, []).extend(survival(transform, spatial, x, d, seg, 1000 * k + case_index, code)
                                                   for k in range(a.draws))
        results[name] = {"method": method, "eps": report["settings"]["eps"],
                         "survival": {k: mean_measured([c for c, _ in v]) for k, v in rows.items()},
                         "amplitude": {k: float(np.mean([g for _, g in v])) for k, v in rows.items()
                                       if not np.isnan(v[0][1])}}
        for key in ("survival", "amplitude"):
            print(name, method, key, {k: v if v is None else round(v, 3) for k, v in results[name][key].items()},
                  flush=True)
    record = {"command": " ".join(["python", "benchmarks/code_survival.py", *(argv or sys.argv[1:])]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": src.name,
              "cases": a.cases, "draws": a.draws, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
