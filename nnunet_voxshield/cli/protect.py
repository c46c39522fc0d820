"""`nnUNetv2_voxshield_protect -d 501`: write nnUNet_raw/Dataset601_<Name>VoxShield."""
import argparse
import os
from fractions import Fraction

from nnunet_voxshield.bilevel import Schedule
from nnunet_voxshield.errors import cli_errors


def budget(text: str) -> float:
    """Accept `4/255` as well as `0.0157`."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}")


def parser() -> argparse.ArgumentParser:
    d = Schedule()
    p = argparse.ArgumentParser(prog="nnUNetv2_voxshield_protect", description=(
        "Protect a raw nnU-Net dataset with VoxShield unlearnable perturbations. The dataset must be planned and "
        "preprocessed (nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres). Writes nnUNet_raw/DatasetXXX_<Name>VoxShield; "
        "the source dataset is never modified. Rerunning the same command resumes an interrupted run."))
    p.add_argument("-d", required=True, help="source dataset id or name (e.g. 501 or Dataset501_Brain)")
    p.add_argument("-o", type=int, default=None, help="output dataset id (default: source id + 100, else first free from 600)")
    p.add_argument("-c", default="3d_fullres", help="nnU-Net configuration whose network is the surrogate [3d_fullres]")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier [nnUNetPlans]")
    p.add_argument("-device", default="cuda", help="cuda, cpu or mps [cuda]")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="processes for the bilevel loop, as in nnUNetv2_train: DDP over N GPUs with -device cuda, "
                        "N gloo processes with -device cpu; each owns a shard of the cases [1]")
    p.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)), help="processes for file work")
    p.add_argument("--method", default="voxshield", choices=["voxshield", "random", "classwise"],
                   help="voxshield (default); random: uniform noise of the same budget and ROI (baseline); "
                        "classwise: one fixed +-eps texture per label shared by all cases (shortcut baseline)")
    p.add_argument("--eps", type=budget, default=None,
                   help="L-inf budget as a fraction of a +-5 sigma window, the paper's unit [4/255 = 0.157 sigma]")
    p.add_argument("--eps-raw", type=float, default=None, help="absolute budget in raw intensity units instead of --eps")
    p.add_argument("--lambda-z", type=float, default=0.2, help="weight of the inter-slice frequency disruption [0.2]")
    p.add_argument("--lambda-s", type=float, default=0.05, help="weight of the semantic prediction disruption [0.05]")
    p.add_argument("--roi", default="label", help="where delta may be nonzero: label, all or dilate:N [label]")
    p.add_argument("--slice-axis", type=int, default=None,
                   help="through-plane axis in preprocessed order (default: largest spacing; isotropic: the file's z)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"bilevel rounds [{d.rounds}]")
    p.add_argument("--surrogate-iters", type=int, default=d.surrogate_iters,
                   help=f"surrogate training batches per round [{d.surrogate_iters}]")
    p.add_argument("--noise-steps", type=int, default=d.noise_steps, help=f"noise steps per case per round [{d.noise_steps}]")
    p.add_argument("--step-size", type=float, default=d.step_size, help=f"noise step as a fraction of eps [{d.step_size}]")
    p.add_argument("--no-eot", action="store_true", help="optimise without random augmentations (the paper's setting)")
    p.add_argument("--stop-ratio", type=float, default=d.stop_ratio,
                   help="stop early once surrogate cross-entropy on x+delta / on clean x falls below this [0: never]")
    p.add_argument("--warm-start", default=None, help="nnU-Net checkpoint (.pth) to initialise the surrogate from")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same output [0]")
    p.add_argument("--continue", dest="resume_only", action="store_true",
                   help="resume an interrupted run (also automatic when the settings match); fail if there is none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset / discard an old run")
    return p


@cli_errors
def main(argv=None):
    a = parser().parse_args(argv)
    from nnunet_voxshield.protect import ProtectSettings, protect  # heavy imports after --help

    settings = ProtectSettings(
        dataset=a.d, output_id=a.o, configuration=a.c, plans=a.p, device=a.device, method=a.method, eps=a.eps,
        eps_raw=a.eps_raw, lambda_z=a.lambda_z, lambda_s=a.lambda_s, roi=a.roi, slice_axis=a.slice_axis,
        schedule=Schedule(rounds=a.rounds, surrogate_iters=a.surrogate_iters, noise_steps=a.noise_steps,
                          step_size=a.step_size, eot=not a.no_eot, stop_ratio=a.stop_ratio),
        seed=a.seed, warm_start=a.warm_start, overwrite=a.overwrite, resume_only=a.resume_only, num_processes=a.np,
        num_gpus=a.num_gpus)
    folder = protect(settings)
    if folder is not None:  # None: another rank of a torchrun group wrote it
        print(f"voxshield: wrote {folder}")
        print(f"voxshield: verify with nnUNetv2_voxshield_check -d {a.d} -pd {folder.name[7:10]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
