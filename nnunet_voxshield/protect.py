"""`nnUNetv2_voxshield_protect`: optimise the perturbations of a raw dataset and write the protected raw dataset."""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_voxshield import __version__
from nnunet_voxshield.atomic import save_npy
from nnunet_voxshield import distributed
from nnunet_voxshield.bilevel import Bilevel, CaseState, Schedule, reseed
from nnunet_voxshield.bridge import preprocess_case, resampler
from nnunet_voxshield.budget import eps_norm, project, roi_mask, validate_eps, parse_roi
from nnunet_voxshield.classwise import classwise_delta, label_textures
from nnunet_voxshield.eot import EOTAugment
from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.export import check_export_supported
from nnunet_voxshield.export_dataset import export_dataset
from nnunet_voxshield.nnunet_env import register_ext_trainer, require_env
from nnunet_voxshield.objectives import VoxShieldObjective, select_slice_axis
from nnunet_voxshield.output import OutputDataset
from nnunet_voxshield.preflight import preflight, require_integer_budget
from nnunet_voxshield.run_state import RunState, fingerprint
from nnunet_voxshield.source import Source, load_source
from nnunet_voxshield.surrogate import nnUNetTrainerVoxShieldSurrogate

METHODS = ("voxshield", "random", "classwise")


@dataclass
class ProtectSettings:
    dataset: str
    output_id: int | None = None
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    device: str = "cuda"
    method: str = "voxshield"      # "random": uniform noise of the same budget and ROI; "classwise": label textures
    eps: float | None = None       # paper unit (fraction of a +-5 sigma window); default 4/255
    eps_raw: float | None = None   # absolute raw-intensity budget instead
    lambda_z: float = 0.2
    lambda_s: float = 0.05
    roi: str = "label"
    slice_axis: int | None = None
    schedule: Schedule = field(default_factory=Schedule)
    seed: int = 0
    warm_start: str | None = None
    overwrite: bool = False
    resume_only: bool = False      # --continue: fail if there is nothing to resume
    num_processes: int = 2         # -np: cases prepared in parallel
    num_gpus: int = 1              # -num_gpus: processes of the bilevel loop (DDP), one GPU each on CUDA

    def optimisation_key(self) -> dict:
        """The settings that define the optimised perturbations (a resumed run must match them)."""
        d = asdict(self)
        for k in ("dataset", "output_id", "device", "overwrite", "resume_only", "num_processes", "num_gpus"):
            d.pop(k)
        return d


def validate(s: ProtectSettings) -> None:
    validate_eps(s.eps, s.eps_raw)
    parse_roi(s.roi)
    if s.method not in METHODS:
        raise VoxShieldError(f"--method must be one of {', '.join(METHODS)}; got {s.method!r}")
    if s.lambda_z < 0 or s.lambda_s < 0:
        raise VoxShieldError("--lambda-z and --lambda-s must be >= 0")
    if s.schedule.rounds < 1 or s.schedule.noise_steps < 1 or s.schedule.surrogate_iters < 0:
        raise VoxShieldError("--rounds and --noise-steps must be >= 1 and --surrogate-iters >= 0")
    if s.slice_axis is not None and s.slice_axis not in (0, 1, 2):
        raise VoxShieldError(f"--slice-axis must be 0, 1 or 2 (preprocessed axis order); got {s.slice_axis}")
    if s.num_gpus < 1:
        raise VoxShieldError(f"-num_gpus must be >= 1; got {s.num_gpus}")


def validate_num_gpus(s: ProtectSettings, src: Source) -> None:
    """nnU-Net splits each batch over the ranks, so every rank needs a sample; CUDA needs a GPU per rank."""
    batch, ranks = src.configuration_manager.batch_size, max(s.num_gpus, distributed.world_size())
    if s.method == "voxshield" and ranks > batch:
        raise VoxShieldError(f"{ranks} processes (-num_gpus) exceed the planned batch size {batch} of "
                             f"{s.configuration}; use -num_gpus {batch} or fewer")
    if s.device == "cuda" and s.num_gpus > torch.cuda.device_count():
        raise VoxShieldError(f"-num_gpus {s.num_gpus} but {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                             f"lower -num_gpus or check CUDA_VISIBLE_DEVICES")


def get_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise VoxShieldError("-device cuda but no CUDA GPU is visible; use -device cpu (slow) or check CUDA_VISIBLE_DEVICES")
    if name == "mps" and not torch.backends.mps.is_available():
        raise VoxShieldError("-device mps but MPS is not available on this machine; use -device cpu")
    if name not in ("cuda", "cpu", "mps"):
        raise VoxShieldError(f"-device must be cuda, cpu or mps; got {name!r}")
    return torch.device(name)


@dataclass
class PreparedCase:
    """A training case with its grid, budget and region, ready for optimisation and export."""
    identifier: str
    grid: object
    eps_norm: np.ndarray
    mask: np.ndarray
    slice_axis: int
    foreground_voxels: int
    labels: np.ndarray             # the label map on the cropped grid


def prepare_case(src: Source, identifier: str, s: ProtectSettings) -> PreparedCase:
    files = src.files[identifier]
    *_, grid = preprocess_case(files["images"], files["label"], src.plans_manager, src.configuration_manager,
                               src.dataset_json, identifier)
    rw = src.plans_manager.image_reader_writer_class()  # images and labels were validated by preflight
    raw, raw_props = rw.read_images(files["images"])
    seg_raw, _ = rw.read_seg(files["label"])
    tf = [0] + [i + 1 for i in src.plans_manager.transpose_forward]
    crop = tuple(slice(a, b) for a, b in grid.bbox)
    nonzero = (raw.transpose(tf)[(slice(None), *crop)] != 0).any(0)
    seg = seg_raw.transpose(tf)[(0, *crop)]
    mask = roi_mask(seg, nonzero, s.roi)
    eps = eps_norm(grid.window, grid.raw_per_norm, s.eps, s.eps_raw)
    require_integer_budget(identifier, files["images"], eps * grid.raw_per_norm)  # before hours of optimisation
    axis = select_slice_axis(raw_props["spacing"], src.plans_manager.transpose_forward, s.slice_axis)
    return PreparedCase(identifier, grid, eps, mask, axis, int((seg > 0).sum()), seg)


def initial_delta(case: PreparedCase, rng: np.random.Generator) -> torch.Tensor:
    """Uniform in [-eps, eps] inside the region (the paper's initialisation, and the random-noise baseline)."""
    shape = (len(case.eps_norm), *case.mask.shape)
    u = torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))
    eps = torch.from_numpy(case.eps_norm.astype(np.float32))
    return project(u * eps.view(-1, 1, 1, 1), eps, torch.from_numpy(case.mask))


def surrogate_folder(src: Source) -> Path:
    """nnU-Net's output folder of the surrogate trainer: checkpoints and run state live there, never in the release."""
    return (Path(require_env()["nnUNet_results"]) / src.name /
            f"{nnUNetTrainerVoxShieldSurrogate.__name__}__{src.plans_manager.plans_name}__{src.configuration}" / "fold_all")


def build_trainer(src: Source, s: ProtectSettings, device: torch.device, resuming: bool):
    register_ext_trainer()
    plans = dict(src.plans)
    plans["continue_training"] = resuming
    trainer = nnUNetTrainerVoxShieldSurrogate(plans, src.configuration, "all", src.dataset_json, device)
    trainer.num_epochs = s.schedule.rounds  # nnU-Net's poly learning-rate schedule spans the rounds
    trainer.initialize()
    if s.warm_start:
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
        if not Path(s.warm_start).is_file():
            raise VoxShieldError(f"--warm-start {s.warm_start}: no such checkpoint file")
        load_pretrained_weights(trainer.network, s.warm_start, verbose=False)
    return trainer


def optimise(src: Source, cases: list[PreparedCase], s: ProtectSettings,
             device: torch.device) -> tuple[dict, list]:
    """Run (or resume) the optimisation; return the final deltas (cropped grid, normalised) and the history."""
    if s.method == "classwise":
        textures = label_textures(src.plans_manager.get_label_manager(src.dataset_json).foreground_labels,
                                  len(cases[0].eps_norm), s.seed)
        return {c.identifier: classwise_delta(c.labels, c.mask, c.eps_norm, textures) for c in cases}, []
    rng = np.random.default_rng(s.seed)
    deltas = {c.identifier: initial_delta(c, rng) for c in cases}
    if s.method == "random":
        return deltas, []
    state = RunState(surrogate_folder(src), s.optimisation_key())
    if distributed.rank() == 0:
        state.check_compatible(s.overwrite)
    distributed.barrier()  # under torchrun: every rank reads the state after rank 0 discarded an old run
    state = RunState(state.folder, s.optimisation_key())
    if s.resume_only and not state.committed:
        raise VoxShieldError(f"--continue: nothing to resume in {state.folder}; run without --continue")
    if state.committed and distributed.rank() == 0:
        print(f"voxshield: resuming after round {state.rounds_done} from {state.folder}")
    if s.num_gpus == 1 or distributed.world_size() > 1:
        return run_bilevel(src, cases, s, device, deltas)
    distributed.spawn(run_bilevel, s.num_gpus, device, src, cases, s, device, deltas)
    state = RunState(state.folder)
    return state.deltas(), state.history


def run_bilevel(src: Source, cases: list[PreparedCase], s: ProtectSettings, device: torch.device,
                deltas: dict) -> tuple[dict, list]:
    """The bilevel loop in this process; under torch.distributed on this rank's shard of the cases.

    Rank 0 gathers every rank's deltas after each round, commits the round and returns all deltas; the other ranks
    return their own shard.
    """
    device = distributed.rank_device(device)
    reseed(s.seed)  # the same surrogate initialisation in every process
    trainer = build_trainer(src, s, device, resuming=False)
    state = RunState(Path(trainer.output_folder), s.optimisation_key())
    if state.committed:
        deltas = state.restore(trainer)
    history = state.history
    if state.committed and state.committed["finished"]:
        return deltas, history

    states = [CaseState(c.identifier, i, resampler(c.grid), torch.from_numpy(c.eps_norm).float().to(device),
                        torch.from_numpy(c.mask).to(device), deltas[c.identifier].to(device), c.slice_axis)
              for i, c in distributed.shard(list(enumerate(cases)))]
    trainer.perturbation_folder.mkdir(parents=True, exist_ok=True)

    def publish(case: CaseState, perturbed_input: np.ndarray):
        save_npy(perturbed_input, trainer.perturbation_folder / f"{case.identifier}.npy")

    generator = torch.Generator()
    rotation, dummy_2d, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    loop = Bilevel(trainer, src.preprocessed_dataset(), states,
                   VoxShieldObjective(trainer.loss, s.lambda_z, s.lambda_s), s.schedule,
                   EOTAugment(rotation, mirror_axes, dummy_2d, generator=generator), generator, s.seed)
    for case in states:
        publish(case, loop.perturbed_inputs(case))
    distributed.barrier()
    trainer.on_train_start()
    lead = distributed.rank() == 0
    bar = tqdm(range(state.rounds_done, s.schedule.rounds), desc="VoxShield rounds", initial=state.rounds_done,
               total=s.schedule.rounds, disable=not lead)
    for r in bar:
        record = loop.run_round(r, publish)
        distributed.check_in_sync(trainer.plain_network)
        history.append(record)
        bar.set_postfix(ratio=f"{record['ratio']:.3f}", seg=f"{record.get('seg', float('nan')):.3f}")
        done = r + 1 == s.schedule.rounds or record["ratio"] < s.schedule.stop_ratio
        own = {c.identifier: c.delta.cpu() for c in states}
        shards = distributed.gather_to_lead(own)
        deltas = own if shards is None else {k: v for shard in shards for k, v in shard.items()}
        if lead:
            state.save(trainer, r + 1, deltas, history, finished=done)
        if done:
            break
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))  # nnU-Net: rank 0 only
    return deltas, history


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
    out = OutputDataset.choose(src.name, s.output_id, s.overwrite)
    preflight(src, s)
    t0 = time.time()
    with ThreadPoolExecutor(max(1, s.num_processes)) as pool:  # file reads and nnU-Net preprocessing, in parallel
        cases = list(tqdm(pool.map(lambda i: prepare_case(src, i, s), src.identifiers), desc="preparing cases",
                          total=len(src.identifiers), disable=distributed.rank() > 0))
    deltas, history = optimise(src, cases, s, device)
    if distributed.rank() > 0:
        return None
    t1 = time.time()
    run_info = {"settings": {**asdict(s), "schedule": asdict(s.schedule)},
                "work_folder": str(surrogate_folder(src)) if s.method == "voxshield" else None,
                "run_fingerprint": fingerprint(s.optimisation_key()),
                "versions": versions(), "history": history,
                "timings_s": {"optimisation": round(t1 - t0, 1)}}
    return export_dataset(src, out, cases, deltas, run_info)


def versions() -> dict:
    import platform
    from importlib.metadata import version

    import SimpleITK
    return {"voxshield": __version__, "nnunetv2": version("nnunetv2"), "torch": torch.__version__,
            "numpy": np.__version__, "SimpleITK": SimpleITK.Version_VersionString(), "python": platform.python_version()}
