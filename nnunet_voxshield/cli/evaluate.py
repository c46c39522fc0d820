"""`nnUNetv2_voxshield_evaluate`: does the protection work? Stock nnU-Net victims, clean vs protected training data."""
import argparse

from nnunet_voxshield.cli.common import add_device, cli_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_voxshield_evaluate",
        description="Train nnU-Net victims on the clean (-d) and on the protected (-pd) dataset and compare their Dice "
                    "on clean held-out cases. Reuses finished nnU-Net results; rerun the same command to resume. "
                    "Writes evaluation.json, evaluation.md and evaluation.png.")
    p.add_argument("-d", required=True, help="clean source dataset (id or DatasetXXX_Name)")
    p.add_argument("-pd", required=True, help="protected dataset written by nnUNetv2_voxshield_protect")
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainer"],
                   help="victim trainers, TRAINER or TRAINER:CONFIGURATION (e.g. nnUNetTrainerVS_ShortNoDA "
                        "nnUNetTrainerVS_Short:2d); VoxShield's victims are found automatically. "
                        "Default: nnUNetTrainer")
    p.add_argument("-c", default="3d_fullres", help="configuration of victims that name none. Default: 3d_fullres")
    p.add_argument("-f", default="0", help="fold to train (0-4 or all). Default: 0")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    p.add_argument("--seeds", type=int, default=3, help="independent training runs per victim and dataset. Default: 3")
    add_device(p)
    p.add_argument("-o", default=None,
                   help="output folder. Default: nnUNet_results/<protected dataset>/voxshield_evaluation")
    p.add_argument("--holdout-val", action="store_true",
                   help="score on the fold's validation cases (from imagesTr, never trained on) instead of "
                        "imagesTs/labelsTs, for datasets without a labelled test set")
    p.add_argument("--verbose", action="store_true", help="show nnU-Net's own output")
    return p


@cli_errors
def main(argv=None):
    a = parser().parse_args(argv)
    from nnunet_voxshield.evaluation.evaluate import evaluate  # torch and nnU-Net only after the arguments parse

    evaluate(a.d, a.pd, trainers=a.tr, configuration=a.c, fold=a.f, seeds=a.seeds, device=a.device, plans=a.p,
             output=a.o, holdout_val=a.holdout_val, verbose=a.verbose)


if __name__ == "__main__":
    main()
