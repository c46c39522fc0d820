"""The optimisation of one protection run: baselines directly, VoxShield through the resumable, distributed bilevel
loop with nnU-Net's own surrogate trainer."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_voxshield.config import ProtectSettings
from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.job.atomic import save_npy
from nnunet_voxshield.job.cases import PreparedCase
from nnunet_voxshield.job.run_state import RunState
from nnunet_voxshield.method.baselines import (GRATING_METHODS, classwise_delta, code_delta, coded_region,
                                                label_levels, label_textures, layered_code, level_code,
                                                method_gratings, uniform_delta)
from nnunet_voxshield.method.bilevel import FRESH_PROBE, Bilevel, CaseState, reseed
from nnunet_voxshield.method.budget import boundary_band
from nnunet_voxshield.method.generator import GeneratorBilevel
from nnunet_voxshield.method.probe import FreshProbe
from nnunet_voxshield.method.eot import EOTAugment
from nnunet_voxshield.method.objectives import TargetedObjective, VoxShieldObjective, cyclic_shift
from nnunet_voxshield.nnunet import distributed
from nnunet_voxshield.nnunet.bridge import resampler
from nnunet_voxshield.nnunet.env import require_env
from nnunet_voxshield.nnunet.source import Source
from nnunet_voxshield.nnunet.surrogate import PerturbedDataset, nnUNetTrainerVoxShieldSurrogate


def surrogate_folder(src: Source) -> Path:
    """nnU-Net's output folder of the surrogate trainer; every run keeps its own folder inside it (never released)."""
    return (Path(require_env()["nnUNet_results"]) / src.name /
            f"{nnUNetTrainerVoxShieldSurrogate.__name__}__{src.plans_manager.plans_name}__{src.configuration}" / "fold_all")


def build_trainer(src: Source, s: ProtectSettings, device: torch.device, run_folder: Path):
    plans = {**src.plans, "continue_training": False}  # the run state, not nnU-Net, restores a resumed run
    trainer = nnUNetTrainerVoxShieldSurrogate(plans, src.configuration, "all", src.dataset_json, device)
    trainer.perturbation_folder = run_folder / "perturbed_inputs"  # runs of one source must not share inputs
    trainer.num_epochs = s.schedule.rounds  # nnU-Net's poly learning-rate schedule spans the rounds
    trainer.initialize()
    if s.warm_start:
        trainer.load_weights(s.warm_start)
    return trainer


def baseline_deltas(src: Source, cases: list[PreparedCase], method: str, seed: int) -> dict | None:
    """The perturbations that need no optimisation: the baselines, and the starts of the optimised methods (INITS);
    None for an optimised method."""
    foreground = src.plans_manager.get_label_manager(src.dataset_json).foreground_labels
    if method == "classwise":
        textures = label_textures(foreground, len(cases[0].eps_norm), seed)
        return {c.identifier: classwise_delta(c.labels, c.mask, c.eps_norm, textures, c.grid.headroom) for c in cases}
    if method in GRATING_METHODS:
        layers = method_gratings(method, foreground, seed)
        clean = src.preprocessed_dataset()
        return {c.identifier: code_delta(layered_code(np.asarray(clean.load_case(c.identifier)[1])[0], layers)[None],
                                         resampler(c.grid), c.eps_norm, coded_region(layers, c.labels, c.mask),
                                         c.grid.headroom) for c in cases}
    if method == "levels":
        clean = src.preprocessed_dataset()
        loaded = [[np.asarray(a) for a in clean.load_case(c.identifier)[:2]] for c in cases]
        levels = label_levels([x for x, _ in loaded], [s[0] for _, s in loaded], foreground)
        return {c.identifier: code_delta(level_code(x, s[0], foreground, levels, c.eps_norm), resampler(c.grid),
                                         c.eps_norm, c.mask, c.grid.headroom)
                for c, (x, s) in zip(cases, loaded)}
    if method in ("random", "uniform"):
        rng = np.random.default_rng(seed)
        return {c.identifier: uniform_delta(c.eps_norm, c.mask, rng, c.grid.headroom) for c in cases}
    return None


def optimise(src: Source, cases: list[PreparedCase], s: ProtectSettings,
             device: torch.device) -> tuple[dict, list, Path | None]:
    """Run, resume or reuse the optimisation; return the final deltas (cropped grid, normalised), the history and
    the run's folder (None for the baselines, which keep no state)."""
    baseline = baseline_deltas(src, cases, s.method, s.seed)
    if baseline is not None:
        return baseline, [], None
    lead = distributed.rank() == 0
    if lead:
        state = RunState.for_settings(surrogate_folder(src), s.optimisation_key())
        if s.overwrite and state.committed:
            state.discard()
    distributed.barrier()  # under torchrun: every rank reads the state after rank 0 adopted or discarded it
    state = RunState.for_settings(surrogate_folder(src), s.optimisation_key())
    if s.resume_only and not state.committed:
        raise VoxShieldError(f"--continue: nothing to resume in {state.folder}; run without --continue")
    if state.finished:
        if lead:
            print(f"voxshield: reusing the finished run {state.folder} (same settings; --overwrite recomputes it)")
        return state.deltas(), state.history, state.folder
    if state.committed and lead:
        print(f"voxshield: resuming after round {state.rounds_done} from {state.folder}")
    # the bilevel loop's start (INITS; the generator's comes from its weights); a resumed run restores
    deltas = None if s.method == "generator" else baseline_deltas(src, cases, s.init, s.seed)
    if s.num_gpus > 1 and distributed.world_size() == 1:
        distributed.spawn(run_bilevel, s.num_gpus, device, src, cases, s, device, deltas, state.folder)
        state = RunState(state.folder)
        return state.deltas(), state.history, state.folder
    deltas, history = run_bilevel(src, cases, s, device, deltas, state.folder)
    return deltas, history, state.folder


def objective(s: ProtectSettings, trainer):
    """The paper's objective, or the targeted poisoning loss toward a cyclic shift of the labels."""
    if s.method == "targeted":
        return TargetedObjective(trainer.loss, cyclic_shift(len(trainer.label_manager.foreground_labels)))
    return VoxShieldObjective(trainer.loss, s.lambda_z, s.lambda_s)


def schedule_of(s: ProtectSettings):
    """Targeted poisoning attacks a fixed clean network: its surrogate never trains."""
    return replace(s.schedule, surrogate_iters=0) if s.method == "targeted" else s.schedule


def _probe_dataset(src: Source, trainer, identifiers, perturbed: bool):
    """Clean preprocessed cases, or the same with the current perturbations added (what the surrogate trains on)."""
    clean = src.preprocessed_dataset(identifiers)
    return PerturbedDataset(clean, trainer.perturbation_folder) if perturbed else clean


def run_bilevel(src: Source, cases: list[PreparedCase], s: ProtectSettings, device: torch.device,
                deltas: dict, folder: Path) -> tuple[dict, list]:
    """The bilevel loop in this process; under torch.distributed on this rank's shard of the cases.

    Rank 0 gathers every rank's deltas after each round, commits the round and returns all deltas; the other ranks
    return their own shard.
    """
    device = distributed.rank_device(device)
    reseed(s.seed)  # the same surrogate initialisation in every process
    trainer = build_trainer(src, s, device, folder)
    state = RunState(folder, s.optimisation_key())
    if state.committed:
        deltas = state.restore(trainer)
    history = state.history

    def free(c: PreparedCase):
        """Where the noise steps may move delta: the boundary band with --free-band, else everywhere (None)."""
        band = s.schedule.free_band
        return torch.from_numpy(boundary_band(np.maximum(c.labels, 0), band)).to(device) if band else None

    states = [CaseState(c.identifier, i, resampler(c.grid), torch.from_numpy(c.eps_norm).float().to(device),
                        torch.from_numpy(c.mask).to(device),
                        None if deltas is None else deltas[c.identifier].to(device), c.slice_axis,
                        None if c.grid.headroom is None else torch.from_numpy(c.grid.headroom).to(device),
                        free=free(c))
              for i, c in distributed.shard(list(enumerate(cases)))]
    trainer.perturbation_folder.mkdir(parents=True, exist_ok=True)

    def publish(case: CaseState, perturbed_input: np.ndarray):
        save_npy(perturbed_input, trainer.perturbation_folder / f"{case.identifier}.npy")

    generator = torch.Generator()
    rotation, dummy_2d, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    args = (trainer, src.preprocessed_dataset(), states, objective(s, trainer), schedule_of(s),
            EOTAugment(rotation, mirror_axes, dummy_2d, generator=generator, hard=s.schedule.eot_hard), generator, s.seed)
    if s.method == "generator":
        # -1 is nnU-Net's mark for background outside the nonzero region, where delta is zero anyway
        labels = {c.identifier: torch.from_numpy(np.maximum(c.labels, 0).astype(np.int16)).to(device) for c in cases}
        loop = GeneratorBilevel(*args, labels=labels, n_classes=int(max(int(v.max()) for v in labels.values())) + 1,
                                n_channels=len(cases[0].eps_norm))
        if state.committed:
            loop.load_state_dict(state.method_state())
    else:
        loop = Bilevel(*args)
    for case in states:
        publish(case, loop.perturbed_inputs(case))
    distributed.barrier()
    trainer.on_train_start()
    lead = distributed.rank() == 0
    probe = FreshProbe(trainer, lambda ids, perturbed: _probe_dataset(src, trainer, ids, perturbed),
                       s.probe_iters) if lead and s.probe_every > 0 else None
    bar = tqdm(range(state.rounds_done, s.schedule.rounds), desc="VoxShield rounds", initial=state.rounds_done,
               total=s.schedule.rounds, disable=not lead)
    for r in bar:
        record = loop.run_round(r, publish)
        distributed.check_in_sync(trainer.plain_network)
        done = r + 1 == s.schedule.rounds or record["ratio"] < s.schedule.stop_ratio
        if probe is not None and ((r + 1) % s.probe_every == 0 or done):
            record.update(probe.measure(reseed(s.seed, r, FRESH_PROBE)))
        history.append(record)
        probed = [h["probe_ratio"] for h in history if h.get("probe_ratio") is not None]
        bar.set_postfix(probe=f"{probed[-1]:.2f}" if probed else "-", ce_ratio=f"{record['ratio']:.3f}")
        own = {c.identifier: c.delta.cpu() for c in states}
        shards = distributed.gather_to_lead(own)
        deltas = own if shards is None else {k: v for shard in shards for k, v in shard.items()}
        if lead:
            state.save(trainer, r + 1, deltas, history, finished=done,
                       extra=loop.state_dict() if isinstance(loop, GeneratorBilevel) else None)
        if done:
            break
    if lead:
        trainer.save_checkpoint(str(folder / "checkpoint_final.pth"))
    return deltas, history
