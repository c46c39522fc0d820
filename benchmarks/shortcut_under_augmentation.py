"""Where a shortcut-trained victim still has something to learn: its Dice on its own protected training cases after
each of stock nnU-Net's training transforms, forced on, beside the same on the clean cases.

A planted code keeps a victim's loss low only on the samples where the code still reads. If the victim segments
protected cases well untransformed but badly after rotation or scaling, those draws are where its loss, and so its
gradient toward the real anatomy, comes from. Each case is centre-cropped (or padded) to the planned patch, then
passed through one transform with probability 1 (the steps of `code_survival.py`), and the victim's argmax is scored
against the transformed labels (mean Dice over the labels present).

    python benchmarks/shortcut_under_augmentation.py -d 502 -pd 613 \\
        -chk <nnUNet_results>/Dataset613_.../nnUNetTrainerVS_Short4x__nnUNetPlans__3d_fullres/fold_0/checkpoint_latest.pth
"""
import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from code_survival import MIRROR_AXES, ROTATION, _apply, clean_and_protected, transforms  # noqa: E402


def fit_to(array: np.ndarray, shape, value) -> torch.Tensor:
    """Centre crop or pad the spatial axes of [C, ...] to `shape`."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    lower = [(s - p) // 2 for s, p in zip(array.shape[1:], shape)]
    bbox = [[lo, lo + p] for lo, p in zip(lower, shape)]
    return torch.from_numpy(np.asarray(crop_and_pad_nd(array, [[0, array.shape[0]]] + bbox, value)))


def dice_of_present_labels(prediction: torch.Tensor, reference: torch.Tensor, labels) -> float:
    """Mean Dice over the labels present in `reference` (a transform can move a label out of the patch)."""
    from nnunet_voxshield.nnunet.scoring import dice_per_label, mean_dice
    ref = reference.numpy()
    score = mean_dice([dice_per_label(prediction.numpy(), ref, [k for k in labels if (ref == k).any()])])
    return float("nan") if score is None else score


def boundary_share(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of the wrong voxels (outside the padding) that touch another label in their 6-neighbourhood."""
    from nnunet_voxshield.method.budget import boundary_band
    ref = reference.numpy()
    edge = boundary_band(np.maximum(ref, 0), 1)
    wrong = (prediction.numpy() != ref) & (ref >= 0)
    return float((wrong & edge).sum() / max(int(wrong.sum()), 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="clean source dataset")
    p.add_argument("-pd", required=True, help="protected dataset the victim was trained on")
    p.add_argument("-chk", required=True, help="the victim's nnU-Net checkpoint")
    p.add_argument("--cases", type=int, default=6, help="training cases")
    p.add_argument("--draws", type=int, default=4, help="random draws per transform and case (0: untransformed only)")
    p.add_argument("--out", default=None, help="JSON record (default: print only)")
    a = p.parse_args(argv)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_voxshield.nnunet.env import dataset_name
    from nnunet_voxshield.nnunet.source import load_source

    torch.set_num_threads(2)
    src = load_source(a.d)
    checkpoint = torch.load(a.chk, map_location="cpu", weights_only=False)
    pm = PlansManager(checkpoint["init_args"]["plans"])
    cm = pm.get_configuration(checkpoint["init_args"]["configuration"])
    labels = pm.get_label_manager(src.dataset_json).foreground_labels
    net = nnUNetTrainer.build_network_architecture(pm, cm, len(src.dataset_json["channel_names"]), len(labels) + 1,
                                                   False)
    net.load_state_dict(checkpoint["network_weights"])
    net.eval()
    patch = tuple(cm.patch_size)
    name = dataset_name(a.pd)
    rows = {}
    for case_index, identifier in enumerate(src.identifiers[:a.cases]):
        x, xp, seg = clean_and_protected(src, name, identifier, pm, cm)
        x, xp, seg = fit_to(x, patch, 0).float(), fit_to(xp, patch, 0).float(), fit_to(seg, patch, -1).to(torch.int16)
        steps = transforms(nnUNetTrainer, patch, ROTATION, MIRROR_AXES) if a.draws else []
        for t_name, transform, _ in [("none", None, None)] + steps:
            for k in range(a.draws if transform is not None else 1):
                for kind, image in (("protected", xp), ("clean", x)):
                    ti, ts = (image, seg) if transform is None else _apply(transform, image, seg, 1000 * k + case_index)
                    with torch.no_grad():
                        prediction = net(ti[None].float())[0].argmax(0)
                    rows.setdefault(t_name, {}).setdefault(kind, []).append(
                        dice_of_present_labels(prediction, ts[0], labels))
                    if transform is None:
                        rows.setdefault("errors on label boundaries", {}).setdefault(kind, []).append(
                            boundary_share(prediction, ts[0]))
        print(identifier, {t: {k: round(float(np.nanmean(v)), 3) for k, v in r.items()} for t, r in rows.items()},
              flush=True)
    table = {t: {k: float(np.nanmean(v)) for k, v in r.items()} for t, r in rows.items()}
    for t, r in table.items():
        print(f"{t:20s} protected {r['protected']:.3f}  clean {r['clean']:.3f}")
    if a.out:
        record = {"command": " ".join(["python", "benchmarks/shortcut_under_augmentation.py", *(argv or sys.argv[1:])]),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": src.name,
                  "protected": name, "checkpoint_epoch": checkpoint["current_epoch"], "cases": a.cases,
                  "draws": a.draws, "dice": table}
        Path(a.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
