"""The nnU-Net environment the plugin lives in: env vars, dataset ids, and calls to stock nnU-Net commands."""
import importlib.util
import os
import subprocess
from contextlib import contextmanager
import sys
from pathlib import Path

from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id, maybe_convert_to_dataset_name

from nnunet_voxshield.errors import VoxShieldError

NNUNET_DIRS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_env(*names: str) -> dict:
    """Return the nnU-Net folders as Paths, or say which variable to export."""
    names = names or NNUNET_DIRS
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise VoxShieldError(f"{', '.join(missing)} not set; export it as for any nnU-Net command "
                             f"(e.g. export {missing[0]}=/data/{missing[0]})")
    return {n: Path(os.environ[n]) for n in names}


def dataset_name(dataset: str | int) -> str:
    """`501` or `Dataset501_Brain` -> `Dataset501_Brain`, with a one-line error for unknown ids."""
    require_env("nnUNet_raw")
    try:
        return maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else str(dataset))
    except (RuntimeError, ValueError):
        raise VoxShieldError(f"dataset {dataset} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results; "
                             f"check -d and the nnUNet_* variables") from None


def dataset_id(name: str, strict: bool = True) -> int | None:
    """`Dataset501_Brain` -> 501 by nnU-Net's own rule; a folder name that is no dataset raises (None if not strict)."""
    if name.startswith("Dataset") and name[7:10].isdigit() and name[10:11] == "_":
        return convert_dataset_name_to_id(name)
    if strict:
        raise VoxShieldError(f"{name!r} is not an nnU-Net dataset name (DatasetXXX_Name)")
    return None


def default_device() -> str:
    """nnU-Net's `-device` default where a GPU is visible, the CPU otherwise."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_device(name: str):
    """`-device` as a torch.device, with a one-line error when the machine has no such device."""
    import torch
    if name not in ("cuda", "cpu", "mps"):
        raise VoxShieldError(f"-device must be cuda, cpu or mps; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise VoxShieldError("-device cuda but no CUDA GPU is visible; use -device cpu (slow) or check CUDA_VISIBLE_DEVICES")
    if name == "mps" and not torch.backends.mps.is_available():
        raise VoxShieldError("-device mps but MPS is not available on this machine; use -device cpu")
    return torch.device(name)


def trainers_dir() -> str:
    """Folder holding VoxShield's trainer classes, for nnU-Net's `nnUNet_extTrainer` lookup."""
    spec = importlib.util.find_spec("nnunet_voxshield_trainers")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(list(spec.submodule_search_locations)[0]).resolve())
    return str((Path(__file__).resolve().parent.parent / "trainers").resolve())


def with_ext_trainer(env: dict) -> dict:
    """Prepend our trainers to nnUNet_extTrainer, keeping the user's own entries."""
    env = dict(env)
    current = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainers_dir() not in current:
        env["nnUNet_extTrainer"] = os.pathsep.join([trainers_dir(), *current])
    return env


@contextmanager
def ext_trainers_visible():
    """For the block only, let in-process nnU-Net lookups (trainer by name) find VoxShield's trainers; the caller's
    environment is restored afterwards."""
    before = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = with_ext_trainer(os.environ)["nnUNet_extTrainer"]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = before


def nnunet_command_env(planning: bool = False) -> dict:
    env = with_ext_trainer(os.environ)
    if planning:
        # nnunetv2 2.8.1 plan_and_preprocess calls torch.set_num_threads(nnUNet_n_proc_DA) and crashes on 0
        env.pop("nnUNet_n_proc_DA", None)
    return env


def run_nnunet(args: list[str], planning: bool = False, quiet: bool = True,
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a stock `nnUNetv2_*` command; on failure raise with the command and the end of its output."""
    exe = Path(sys.executable).parent / args[0]
    cmd = [str(exe) if exe.exists() else args[0], *map(str, args[1:])]
    res = subprocess.run(cmd, env={**nnunet_command_env(planning), **(extra_env or {})}, text=True,
                         stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    if res.returncode != 0:
        tail = " | ".join((res.stdout or "").strip().splitlines()[-3:])
        raise VoxShieldError(f"`{' '.join(map(str, args))}` failed (exit {res.returncode}): {tail}")
    return res


def plan_and_preprocess(dataset: int | str, configurations=("3d_fullres",), num_processes: int = 2) -> None:
    """Stock `nnUNetv2_plan_and_preprocess`, as a user would run it."""
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(dataset), "-c", *configurations,
                "-np", str(num_processes), "--verify_dataset_integrity"], planning=True)
