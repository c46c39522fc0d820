"""`nnUNetv2_voxshield_check -d 501 -pd 601`: exit 0 when budget, fidelity and survival hold on disk."""
import argparse
import sys

from nnunet_voxshield.cli.common import cli_errors
from nnunet_voxshield.config import MIN_SURVIVAL


@cli_errors
def main(argv=None):
    p = argparse.ArgumentParser(prog="nnUNetv2_voxshield_check", description=(
        "Verify a protected dataset against its source: budget after rounding, identical geometry/dtype/format/"
        "labels/dataset.json, and survival of the perturbation through nnU-Net's own preprocessing."))
    p.add_argument("-d", required=True, help="source dataset id or name")
    p.add_argument("-pd", required=True, help="protected dataset id or name")
    p.add_argument("-c", default="3d_fullres", help="configuration used for protection [3d_fullres]")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier [nnUNetPlans]")
    p.add_argument("--min-survival", type=float, default=MIN_SURVIVAL,
                   help=f"required survival correlation per case [{MIN_SURVIVAL}]")
    a = p.parse_args(argv)
    from nnunet_voxshield.release.check import check

    res = check(a.d, a.pd, a.c, a.p, a.min_survival)
    print("\n".join(res.lines))
    if res.violations:
        print(f"FAILED: {len(res.violations)} violation(s)")
        print("\n".join(f"  - {v}" for v in res.violations))
        return 1
    print("OK: all promises hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
