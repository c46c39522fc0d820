"""Design c: one small 3D conv net maps a case's label map to its perturbation, for every case.

Per-case noise (the paper, design b) is free to differ from case to case; a fixed code (design a) is the same
everywhere but not optimised. The generator is both: trained in the bilevel loop in place of the per-case noise
steps (Adam on the objective of the frozen surrogate, through nnU-Net's resampling, patch sampling and the
augmentations), it is one function of the local label configuration, so equal neighbourhoods get equal patterns in
every case. Its input is the one-hot label map of the cropped grid only: an image input would let the pattern
follow each case's intensities and give up that consistency (UnSeg, Sun et al., NeurIPS 2024, feeds image and
mask to its generator; this is the label-only variant).

    delta = project(eps * (t - mean of t over each label of the case)),   t = tanh(G(onehot))

The budget, the region and the clip window hold by construction. The pattern has zero mean inside every label:
a per-label offset is the error-minimising solution a generator finds first (the first run on the anatomy set went
to +eps on all foreground within its first round and stayed there, tanh saturated), and an offset is a feature
consistent with the real one that speeds a victim up instead of misleading it (the shipped default's lesson). Zero
mean leaves only codes that a texture filter reads.
"""
import torch
from torch import nn

from nnunet_voxshield.method.bilevel import GENERATOR, NOISE, Bilevel, CaseState, reseed
from nnunet_voxshield.method.budget import project

WIDTH = 16
"""Feature maps of the generator's hidden layers."""
LEARNING_RATE = 3e-3
"""Adam's step size for the generator's weights."""


class DeltaGenerator(nn.Module):
    """One-hot labels [B, K, ...] -> pattern in [-1, 1] [B, C, ...]; receptive field 11 voxels."""

    def __init__(self, n_classes: int, n_channels: int, width: int = WIDTH):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(n_classes, width, 3, padding=1), nn.LeakyReLU(0.01),
            nn.Conv3d(width, width, 3, padding=2, dilation=2), nn.LeakyReLU(0.01),
            nn.Conv3d(width, width, 3, padding=2, dilation=2), nn.LeakyReLU(0.01),
            nn.Conv3d(width, n_channels, 3, padding=1))

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layers(onehot))


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Label map [...] (integers 0..n_classes-1) -> [n_classes, ...] float."""
    return nn.functional.one_hot(labels.long(), n_classes).movedim(-1, 0).float()


def zero_mean_per_label(pattern: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """pattern [C, ...] minus its mean over each label's voxels (onehot [K, ...]), per channel."""
    spatial = tuple(range(1, onehot.ndim))
    sums = torch.einsum("c...,k...->ck", pattern, onehot)
    means = sums / onehot.sum(spatial).clamp(min=1)  # [C, K]
    return pattern - torch.einsum("ck,k...->c...", means, onehot)


class GeneratorBilevel(Bilevel):
    """The bilevel loop with the noise level replaced by training one generator shared by all cases.

    `labels` maps each case's identifier to its label map on the cropped grid (integers below `n_classes`, kept
    small and expanded to one-hot on use: K float maps per case would not fit for large CT). Every noise step is
    one Adam step on one case's objective; after the pass over the cases every delta is recomputed with the final
    weights, so the published perturbations all come from one generator.
    """
    publish_per_case = False  # every delta depends on the shared weights: published after the round

    def __init__(self, *args, labels: dict, n_classes: int, n_channels: int, **kwargs):
        super().__init__(*args, **kwargs)
        reseed(self.seed, 0, GENERATOR)
        self.delta_net = DeltaGenerator(n_classes, n_channels).to(self.device)
        self.optimiser = torch.optim.Adam(self.delta_net.parameters(), lr=LEARNING_RATE)
        self.labels, self.n_classes = labels, n_classes
        self.refresh()

    def delta_of(self, case: CaseState) -> torch.Tensor:
        bound = case.eps.to(self.device).view(-1, 1, 1, 1)
        onehot = one_hot(self.labels[case.identifier], self.n_classes)
        return project(bound * zero_mean_per_label(self.delta_net(onehot[None])[0], onehot), case.eps, case.mask,
                       case.headroom)

    @torch.no_grad()
    def refresh(self) -> None:
        for case in self.cases:
            case.delta = self.delta_of(case)

    def noise_update(self, case: CaseState, round_idx: int, loaded: tuple) -> dict:
        self.generator.manual_seed(reseed(self.seed, round_idx, NOISE, case.index))
        parts = {}
        self.delta_net.train()
        for _ in range(self.schedule.noise_steps):
            total, parts = self.objective_on_patches(case, self.delta_of(case), loaded)
            # Adam ignores a constant scale: it only keeps float16 gradients from underflowing under autocast
            grads = torch.autograd.grad(total * self._loss_scale(), list(self.delta_net.parameters()))
            for p, g in zip(self.delta_net.parameters(), grads):
                p.grad = g
            self.optimiser.step()
        with torch.no_grad():
            case.delta = self.delta_of(case)
        return parts

    def run_round(self, round_idx: int, publish) -> dict:
        """Publish once per round, after every delta comes from the final weights (one process: no barrier)."""
        record = super().run_round(round_idx, publish)
        self.refresh()
        for case in self.cases:
            publish(case, self.perturbed_inputs(case))
        return record

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the deltas: the generator's weights and Adam's moments."""
        return {"generator": self.delta_net.state_dict(), "generator_optimiser": self.optimiser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.delta_net.load_state_dict(state["generator"])
        self.optimiser.load_state_dict(state["generator_optimiser"])
        self.refresh()
