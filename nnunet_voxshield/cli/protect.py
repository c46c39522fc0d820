"""`nnUNetv2_voxshield_protect -d 501`: write nnUNet_raw/Dataset601_<Name>VoxShield."""
import argparse
import os

from nnunet_voxshield.cli.common import add_device, budget, cli_errors, protected_id
from nnunet_voxshield.config import (INITS, LAMBDA_S, LAMBDA_Z, METHODS, MIN_SURVIVAL, PROBE_EVERY, PROBE_ITERS, ROI,
                                     ProtectSettings, Schedule)


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
    add_device(p, "cuda")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="processes for the bilevel loop, as in nnUNetv2_train: DDP over N GPUs with -device cuda, "
                        "N gloo processes with -device cpu; each owns a shard of the cases [1]")
    p.add_argument("-np", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 2)), help="processes for file work")
    p.add_argument("--method", default="voxshield", choices=METHODS,
                   help="voxshield: the paper's bilevel objective (default); random: uniform noise of the same budget "
                        "and ROI; classwise: one fixed +-eps texture per label; codes: one +-eps grating per label on "
                        "nnU-Net's preprocessed grid; presence: one grating for all foreground; absence: one grating "
                        "on the background (--roi all or dilate:N), none on the labels; rim: the presence grating "
                        "on the labels and another on the background (--roi all or dilate:N); parity: one +-eps "
                        "period-2 code (-1)^(a.x) per label, readable to the voxel; twoscale: half the budget to each "
                        "label's grating, half to its parity code; levels: each label's voxels moved toward an "
                        "intensity level of its own; targeted: push a "
                        "clean-trained nnU-Net (--warm-start) toward a cyclic shift of the labels; generator: the paper's "
                        "objective through one small conv net mapping every case's labels to its delta")
    p.add_argument("--eps", type=budget, default=None,
                   help="L-inf budget as a fraction of a +-5 sigma window, the paper's unit [4/255 = 0.157 sigma]")
    p.add_argument("--eps-raw", type=float, default=None, help="absolute budget in raw intensity units instead of --eps")
    p.add_argument("--lambda-z", type=float, default=LAMBDA_Z,
                   help=f"weight of the inter-slice frequency disruption [{LAMBDA_Z}]")
    p.add_argument("--lambda-s", type=float, default=LAMBDA_S,
                   help=f"weight of the semantic prediction disruption [{LAMBDA_S}]")
    p.add_argument("--roi", default=ROI, help=f"where delta may be nonzero: label, all or dilate:N [{ROI}]")
    p.add_argument("--slice-axis", type=int, default=None,
                   help="through-plane axis in preprocessed order (default: largest spacing; isotropic: the file's z)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"bilevel rounds [{d.rounds}]")
    p.add_argument("--surrogate-iters", type=int, default=d.surrogate_iters,
                   help=f"surrogate training batches per round [{d.surrogate_iters}]")
    p.add_argument("--noise-steps", type=int, default=d.noise_steps, help=f"noise steps per case per round [{d.noise_steps}]")
    p.add_argument("--step-size", type=float, default=d.step_size, help=f"noise step as a fraction of eps [{d.step_size}]")
    p.add_argument("--no-eot", action="store_true", help="optimise without random augmentations (the paper's setting)")
    p.add_argument("--eot-hard", type=float, default=d.eot_hard,
                   help="share of the augmentation draws with Gaussian noise, blur and low resolution all forced on, "
                        "so the perturbation also survives blurring and quantising attackers (ISS) [0: nnU-Net's rates]")
    p.add_argument("--stop-ratio", type=float, default=d.stop_ratio,
                   help="stop early once surrogate cross-entropy on x+delta / on clean x falls below this [0: never]")
    p.add_argument("--reinit-every", type=int, default=d.reinit_every,
                   help="re-initialise the surrogate every K rounds, so the noise keeps working on young networks, "
                        "the stage at which a victim picks its features [0: never]")
    p.add_argument("--free-band", type=int, default=d.free_band,
                   help="with --init codes/presence: noise steps move only voxels within N of a label boundary and "
                        "the code stays as drawn elsewhere (a victim that learnt the code errs at boundaries) [0: all]")
    p.add_argument("--init", default="uniform", choices=INITS,
                   help="start of the optimised methods: uniform noise (the paper), or the codes / presence gratings "
                        "[uniform]")
    p.add_argument("--probe-every", type=int, default=PROBE_EVERY,
                   help=f"rounds between fresh-network probes, and after the last round; 0: none [{PROBE_EVERY}]")
    p.add_argument("--probe-iters", type=int, default=PROBE_ITERS,
                   help=f"training iterations of each fresh probe network [{PROBE_ITERS}]")
    p.add_argument("--warm-start", default=None, help="nnU-Net checkpoint (.pth) to initialise the surrogate from")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same output [0]")
    p.add_argument("--continue", dest="resume_only", action="store_true",
                   help="resume an interrupted run (also automatic when the settings match); fail if there is none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output dataset and recompute its run from scratch")
    p.add_argument("--min-survival", type=float, default=MIN_SURVIVAL,
                   help=f"refuse to release when a case's survival correlation is below this [{MIN_SURVIVAL}]")
    p.add_argument("--accept-low-survival", action="store_true",
                   help="release even when some case's survival is below --min-survival (said in the log and "
                        "recorded in voxshield.json)")
    return p


@cli_errors
def main(argv=None):
    a = parser().parse_args(argv)
    from nnunet_voxshield.release.protect import protect  # torch and nnU-Net only after the arguments parse

    settings = ProtectSettings(
        dataset=a.d, output_id=a.o, configuration=a.c, plans=a.p, device=a.device, method=a.method, eps=a.eps,
        eps_raw=a.eps_raw, lambda_z=a.lambda_z, lambda_s=a.lambda_s, roi=a.roi, slice_axis=a.slice_axis,
        schedule=Schedule(rounds=a.rounds, surrogate_iters=a.surrogate_iters, noise_steps=a.noise_steps,
                          step_size=a.step_size, eot=not a.no_eot, eot_hard=a.eot_hard, stop_ratio=a.stop_ratio,
                          reinit_every=a.reinit_every, free_band=a.free_band),
        seed=a.seed, warm_start=a.warm_start, init=a.init, overwrite=a.overwrite, resume_only=a.resume_only,
        num_processes=a.np, num_gpus=a.num_gpus, min_survival=a.min_survival, accept_low_survival=a.accept_low_survival,
        probe_every=a.probe_every, probe_iters=a.probe_iters)
    folder = protect(settings)
    if folder is not None:  # None: another rank of a torchrun group wrote it
        print(f"voxshield: wrote {folder}")
        print(f"voxshield: verify with nnUNetv2_voxshield_check -d {a.d} -pd {protected_id(folder)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
