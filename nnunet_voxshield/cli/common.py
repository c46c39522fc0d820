"""What every `nnUNetv2_voxshield_*` entry point shares: one-line errors, the -device flag and budget parsing.

Nothing here imports torch or nnU-Net, so `--help` and argument errors answer at once.
"""
import argparse
import functools
import sys
from fractions import Fraction

from nnunet_voxshield.errors import VoxShieldError, os_error_message


def cli_errors(main):
    """Turn VoxShieldError and fixable OS errors into `voxshield: error: ...` on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except VoxShieldError as e:
            print(f"voxshield: error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            message = os_error_message(e)
            if message is None:
                raise
            print(f"voxshield: error: {message}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("voxshield: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
    return wrapper


def budget(text: str) -> float:
    """Accept `4/255` as well as `0.0157`."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}")


def add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """nnU-Net's `-device` flag; without a default, the GPU when one is visible, else the CPU."""
    what = default or "cuda if available, else cpu"
    p.add_argument("-device", default=default, choices=("cuda", "cpu", "mps"), help=f"cuda, cpu or mps [{what}]")


def resolve_device(name: str | None) -> str:
    from nnunet_voxshield.nnunet.env import default_device
    return name or default_device()


def protected_id(folder) -> str:
    """The id of a written protected dataset, for the next command's -pd."""
    from nnunet_voxshield.nnunet.env import dataset_id
    return str(dataset_id(folder.name))
