"""The bilevel min-min loop: surrogate steps on x + delta, then error-minimising noise steps on every case.

    min_theta E_i [ min_{|delta_i| <= eps}  Seg(f(x_i + R delta_i), y_i) - lambda_z ZDiv(delta_i)
                                              - lambda_s |f(x_i + R delta_i) - f(x_i)| ]

delta lives on nnU-Net's cropped grid in normalised units; R is nnU-Net's resampling to the preprocessed grid.
Noise steps sample patches the way nnU-Net's data loader does and pass them through random nnU-Net-like
augmentations (expectation over transformation), because the victim trains on augmented patches.

Every random draw is seeded from (seed, round, what is drawn), never from what ran before. A resumed run therefore
repeats an uninterrupted one, and under `-num_gpus N` (each rank owns a shard of the cases, the surrogate trains
with DDP) a case's noise steps do not depend on which rank runs them.
"""
import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from tqdm import tqdm

from nnunet_voxshield.config import Schedule
from nnunet_voxshield.method.budget import project
from nnunet_voxshield.nnunet.distributed import all_gather, barrier, rank

SURROGATE, NOISE, PROBE, FRESH_PROBE, REINIT, GENERATOR = range(6)  # the random streams of a run


def reseed(seed: int, *keys: int) -> int:
    """Seed torch, numpy and random from (seed, *keys); returns the derived seed."""
    derived = int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)
    return derived


@dataclass
class CaseState:
    """Everything the loop needs about one training case."""
    identifier: str
    index: int                     # position in the dataset: names the case's random stream
    resample: object               # cropped grid -> preprocessed grid (differentiable)
    eps: torch.Tensor              # [C] budget in normalised units
    mask: torch.Tensor             # cropped grid, True where delta may be nonzero
    delta: torch.Tensor            # [C, *cropped shape]
    slice_axis: int                # through-plane axis in preprocessed spatial order
    headroom: torch.Tensor | None = None  # [2, C, *cropped shape]: the clip window, see nnunet.bridge.CaseGrid
    probe_bbox: list = field(default=None)  # fixed foreground patch used to measure the shortcut
    free: torch.Tensor | None = None  # cropped grid: where noise steps may move delta (None: everywhere in the mask)


def to_device_case(dataset, identifier: str, device: torch.device):
    """Clean preprocessed data, target (outside-nonzero -1 mapped to background) and properties of one case."""
    data, seg, _, props = dataset.load_case(identifier)
    x, y = (_to_device(torch.from_numpy(a), device) for a in (np.asarray(data, dtype=np.float32),
                                                               np.asarray(seg).astype(np.int16)))
    return x, torch.clamp(y, min=0), props


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned, asynchronous host-to-device copy on CUDA; a no-op on the CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Bilevel:
    """Runs rounds of (surrogate steps, noise pass) on an initialised nnUNetTrainerVoxShieldSurrogate."""

    publish_per_case = True
    """Whether run_round publishes each case's delta as soon as it is updated (a subclass whose deltas all change
    together publishes after the round instead)."""

    def __init__(self, trainer, dataset, cases: list[CaseState], objective, schedule: Schedule, eot=None,
                 generator: torch.Generator | None = None, seed: int = 0):
        """`dataset` is the clean nnU-Net dataset; `cases` are this rank's; `eot` must draw from `generator`."""
        self.trainer, self.dataset, self.cases, self.objective = trainer, dataset, cases, objective
        self.schedule, self.seed = schedule, seed
        self.eot = eot if schedule.eot else None
        self.generator = generator or torch.Generator()
        self.device = trainer.device
        self.net = trainer.plain_network
        self.patch_size = list(trainer.configuration_manager.patch_size)
        batch_size, oversample = trainer.global_batch
        self.n_patches = schedule.patches or batch_size
        self.sampler = nnUNetDataLoader(self.dataset, self.n_patches, self.patch_size, self.patch_size,
                                        trainer.label_manager, oversample_foreground_percent=oversample)

    # ---- surrogate level -------------------------------------------------------------------------------------
    def surrogate_steps(self, round_idx: int) -> float:
        """Train the surrogate; with `reinit_every` K it starts over every K rounds, so that the noise keeps
        minimising the loss of young networks (what a victim is when it picks its features) and each life follows
        nnU-Net's learning-rate schedule from the start."""
        t, every = self.trainer, self.schedule.reinit_every
        if every and round_idx and round_idx % every == 0:
            t.reinitialise(reseed(self.seed, round_idx, REINIT))
        t.network.train()
        t.lr_scheduler.step(round_idx % every if every else round_idx)
        reseed(self.seed, round_idx, SURROGATE, rank())
        losses = [float(t.train_step(next(t.dataloader_train))["loss"]) for _ in range(self.schedule.surrogate_iters)]
        return float(np.mean(losses)) if losses else float("nan")

    # ---- noise level -----------------------------------------------------------------------------------------
    def _patches(self, tensors, props, bboxes=None):
        """Crop nnU-Net-style patches (foreground-oversampled, padded at borders) from each tensor [C, ...]."""
        shape = tensors[0].shape[1:]
        if bboxes is None:
            bboxes = []
            for j in range(self.n_patches):
                lbs, ubs = self.sampler.get_bbox(shape, self.sampler.get_do_oversample(j), props["class_locations"])
                bboxes.append([[a, b] for a, b in zip(lbs, ubs)])
        return [torch.stack([crop_and_pad_nd(t, bb, 0) for bb in bboxes]) for t in tensors], bboxes

    def _augmented_pair(self, x_adv, x_clean, y):
        """The same random augmentation applied to the perturbed and the clean patches."""
        if self.eot is None:
            return x_adv, x_clean, y
        state = self.generator.get_state()
        xa, ya = self.eot(x_adv, y)
        self.generator.set_state(state)
        with torch.no_grad():
            xc, _ = self.eot(x_clean, y)
        return xa, xc, ya

    def noise_update(self, case: CaseState, round_idx: int, loaded: tuple) -> dict:
        """`loaded` is the case's `to_device_case`, shared with the shortcut probe of the same round."""
        self.generator.manual_seed(reseed(self.seed, round_idx, NOISE, case.index))
        parts = {}
        for _ in range(self.schedule.noise_steps):
            delta = case.delta.detach().clone().requires_grad_(True)
            total, parts = self.objective_on_patches(case, delta, loaded)
            # only the sign is used: scaling keeps float16 gradients from underflowing under autocast
            grad, = torch.autograd.grad(total * self._loss_scale(), delta)
            step = self.schedule.step_size * case.eps.to(delta).view(-1, *[1] * (delta.ndim - 1))
            if case.free is not None:
                step = step * case.free.to(delta)
            case.delta = project(delta.detach() - step * grad.sign(), case.eps, case.mask, case.headroom)
        return parts

    def objective_on_patches(self, case: CaseState, delta: torch.Tensor, loaded: tuple) -> tuple:
        """The objective of the frozen surrogate on freshly sampled, augmented patches of x + R(delta)."""
        x, y, props = loaded
        net = self.net
        net.eval()
        (pa, pc, py), _ = self._patches([x + case.resample(delta), x, y], props)
        xa, xc, ya = self._augmented_pair(pa, pc, py)
        logits_clean = None
        with self._autocast():
            if self.objective.lambda_s > 0:
                with torch.no_grad():
                    logits_clean = net(xc)
            return self.objective(net(xa), ya, delta[None], case.slice_axis, logits_clean)

    def _loss_scale(self) -> float:
        """Keeps float16 gradients from underflowing under CUDA autocast; 1 elsewhere."""
        return 1024.0 if self.device.type == "cuda" else 1.0

    def _autocast(self):
        """Mixed precision on CUDA, as nnU-Net's own train_step; full precision elsewhere."""
        return torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()

    # ---- measurement -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def shortcut(self, case: CaseState, loaded: tuple) -> tuple[float, float]:
        """Surrogate cross-entropy on the case's fixed foreground patch, on x + delta and on clean x.

        Cross-entropy rather than nnU-Net's Dice+CE, whose Dice part is negative, so that the ratio of the means
        means something: far below 1 is a shortcut, about 1 is none. The surrogate is fixed during the noise pass,
        so probing right after the case's update measures the same as probing after the whole pass.
        """
        self.net.eval()
        x, y, props = loaded
        if case.probe_bbox is None:
            reseed(self.seed, 0, PROBE, case.index)
        (pa, pc, py), case.probe_bbox = self._patches([x + case.resample(case.delta), x, y], props, case.probe_bbox)
        target = py[:1, 0].long()
        return float(F.cross_entropy(self.net(pa[:1]), target)), float(F.cross_entropy(self.net(pc[:1]), target))

    def perturbed_inputs(self, case: CaseState) -> np.ndarray:
        """R(delta) on the preprocessed grid, what the surrogate's data loader adds to the case."""
        with torch.no_grad():
            return case.resample(case.delta).cpu().numpy().astype(np.float32)

    def run_round(self, round_idx: int, publish) -> dict:
        """One round; `publish(case, perturbed_input)` makes the new delta visible to the data loader.

        Under torch.distributed every rank runs this with its own cases; the record is over all cases.
        """
        surrogate_loss = self.surrogate_steps(round_idx)
        parts, probes = [], []
        for case in tqdm(self.cases, desc=f"round {round_idx + 1} noise", leave=False, disable=rank() > 0):
            loaded = to_device_case(self.dataset, case.identifier, self.device)  # read once per case and round
            parts.append(self.noise_update(case, round_idx, loaded))
            probes.append(self.shortcut(case, loaded))
            if self.publish_per_case:
                publish(case, self.perturbed_inputs(case))
        barrier()  # every rank's new perturbations are on disk before any rank trains on them
        gathered = all_gather((surrogate_loss, parts, probes))
        parts = [p for _, ps, _ in gathered for p in ps]
        adv, clean = np.mean([[a, c] for *_, pr in gathered for a, c in pr], axis=0)
        return {"round": round_idx + 1, "surrogate_train_loss": float(np.mean([g[0] for g in gathered])),
                **{k: float(np.mean([p[k] for p in parts])) for k in (parts[0] if parts else {})},
                "ce_perturbed": float(adv), "ce_clean": float(clean), "ratio": float(adv / max(clean, 1e-12))}
