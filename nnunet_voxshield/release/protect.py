"""`nnUNetv2_voxshield_protect`: check the source, prepare its cases, optimise (job/), write the release."""
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_voxshield import __version__
from nnunet_voxshield.config import INITS, METHODS, ProtectSettings
from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.job.cases import prepare_case, require_perturbable
from nnunet_voxshield.job.optimise import optimise
from nnunet_voxshield.job.preflight import preflight
from nnunet_voxshield.job.run_state import fingerprint
from nnunet_voxshield.method.budget import parse_roi, validate_eps
from nnunet_voxshield.method.objectives import check_slice_axis
from nnunet_voxshield.nnunet import distributed
from nnunet_voxshield.nnunet.env import get_device
from nnunet_voxshield.nnunet.source import Source, load_source
from nnunet_voxshield.release.case_export import check_export_supported
from nnunet_voxshield.release.dataset_export import REPORT, export_dataset
from nnunet_voxshield.release.output import OutputDataset


def validate(s: ProtectSettings) -> None:
    validate_eps(s.eps, s.eps_raw)
    parse_roi(s.roi)
    if s.method not in METHODS:
        raise VoxShieldError(f"--method must be one of {', '.join(METHODS)}; got {s.method!r}")
    if s.method in ("absence", "rim") and parse_roi(s.roi)[0] == "label":
        raise VoxShieldError(f"--method {s.method} codes the background around the labels: pass --roi all (every "
                             "nonzero voxel) or --roi dilate:N (a rim of N voxels)")
    if s.method == "targeted" and not s.warm_start:
        raise VoxShieldError("--method targeted pushes a clean-trained nnU-Net toward other labels: pass its "
                             "checkpoint with --warm-start (e.g. .../fold_0/checkpoint_final.pth of the same plans)")
    if s.init not in INITS:
        raise VoxShieldError(f"--init must be one of {', '.join(INITS)}; got {s.init!r}")
    if s.init != "uniform" and s.method not in ("voxshield", "targeted"):
        what = "starts from its generator's weights" if s.method == "generator" else "is not optimised"
        raise VoxShieldError(f"--init starts the per-case noise of voxshield and targeted; --method {s.method} {what}")
    if s.schedule.reinit_every < 0 or (s.schedule.reinit_every and s.method == "targeted"):
        raise VoxShieldError("--reinit-every must be >= 0, and 0 with --method targeted (its clean network is fixed)")
    if s.schedule.free_band < 0 or (s.schedule.free_band and (s.method not in ("voxshield", "targeted")
                                                                or s.init == "uniform")):
        raise VoxShieldError("--free-band refines a start it keeps elsewhere: it needs --init codes or presence and "
                             "--method voxshield or targeted, and must be >= 0")
    if not 0 <= s.schedule.eot_hard <= 1 or (s.schedule.eot_hard and not s.schedule.eot):
        raise VoxShieldError("--eot-hard is a share of the augmentation draws: give a value in [0, 1], without --no-eot")
    if s.lambda_z < 0 or s.lambda_s < 0:
        raise VoxShieldError("--lambda-z and --lambda-s must be >= 0")
    if s.schedule.rounds < 1 or s.schedule.noise_steps < 1 or s.schedule.surrogate_iters < 0:
        raise VoxShieldError("--rounds and --noise-steps must be >= 1 and --surrogate-iters >= 0")
    if s.slice_axis is not None:
        check_slice_axis(s.slice_axis, "--slice-axis")
    if s.num_gpus < 1:
        raise VoxShieldError(f"-num_gpus must be >= 1; got {s.num_gpus}")
    if s.probe_every < 0 or s.probe_iters < 1:
        raise VoxShieldError("--probe-every must be >= 0 (0: no probe) and --probe-iters >= 1")


def validate_num_gpus(s: ProtectSettings, src: Source) -> None:
    """nnU-Net splits each batch over the ranks, so every rank needs a sample; CUDA needs a GPU per rank."""
    batch, ranks = src.configuration_manager.batch_size, max(s.num_gpus, distributed.world_size())
    if s.method == "generator" and ranks > 1:
        raise VoxShieldError("--method generator trains one network on every case in one process; use -num_gpus 1")
    if s.method == "voxshield" and ranks > batch:
        raise VoxShieldError(f"{ranks} processes (-num_gpus) exceed the planned batch size {batch} of "
                             f"{s.configuration}; use -num_gpus {batch} or fewer")
    if s.device == "cuda" and s.num_gpus > torch.cuda.device_count():
        raise VoxShieldError(f"-num_gpus {s.num_gpus} but {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                             f"lower -num_gpus or check CUDA_VISIBLE_DEVICES")


def protect(s: ProtectSettings) -> Path | None:
    """The whole job; returns the folder of the protected raw dataset.

    Started by torchrun (one process per GPU, on one or several nodes), every process joins the group, prepares the
    cases and optimises its shard; only global rank 0 writes the dataset (the other ranks return None).
    """
    if distributed.launched_by_torchrun():
        with distributed.process_group(get_device(s.device)):
            return _protect(s)
    return _protect(s)


def _protect(s: ProtectSettings) -> Path | None:
    validate(s)
    device = get_device(s.device)
    src = load_source(s.dataset, s.configuration, s.plans)
    check_export_supported(src.plans_manager, src.dataset_json)
    validate_num_gpus(s, src)
    key = fingerprint(s.optimisation_key())
    done = _complete_output(src.name, s, key)
    if done is not None:
        return done
    out = OutputDataset.choose(src.name, s.output_id, s.overwrite)
    preflight(src, s)
    t0 = time.time()
    with ThreadPoolExecutor(max(1, s.num_processes)) as pool:  # file reads and nnU-Net preprocessing, in parallel
        cases = list(tqdm(pool.map(lambda i: prepare_case(src, i, s), src.identifiers), desc="preparing cases",
                          total=len(src.identifiers), disable=distributed.rank() > 0))
    require_perturbable(cases, s.roi)
    deltas, history, run_folder = optimise(src, cases, s, device)
    if distributed.rank() > 0:
        return None
    t1 = time.time()
    run_info = {"settings": {**asdict(s), "schedule": asdict(s.schedule)},
                "work_folder": None if run_folder is None else str(run_folder),
                "run_fingerprint": key, "versions": versions(), "history": history,
                "probe": next((h for h in reversed(history) if "probe_ratio" in h), None),
                "timings_s": {"optimisation": round(t1 - t0, 1)}}
    return export_dataset(src, out, cases, deltas, run_info)


def _complete_output(source_name: str, s: ProtectSettings, key: str) -> Path | None:
    """With --continue, an output that this very run already wrote completely: said, and nothing to do."""
    if not s.resume_only:
        return None
    out = OutputDataset.named(source_name, s.output_id)
    report = out.folder / REPORT
    if report.is_file() and json.loads(report.read_text()).get("run_fingerprint") == key:
        if distributed.rank() == 0:
            print(f"voxshield: {out.folder} is already complete for these settings; nothing to resume")
        return out.folder
    return None


def versions() -> dict:
    import platform
    from importlib.metadata import version

    import SimpleITK
    return {"voxshield": __version__, "nnunetv2": version("nnunetv2"), "torch": torch.__version__,
            "numpy": np.__version__, "SimpleITK": SimpleITK.Version_VersionString(), "python": platform.python_version()}
