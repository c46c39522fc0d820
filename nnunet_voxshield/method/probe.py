"""The fresh-network probe: would a victim learn the real task from the current protected cases?

A co-trained surrogate's loss says nothing about fresh victims (DESIGN: a surrogate CE ratio of 0.63 came with a
victim ratio of 0.98). So every few rounds a freshly initialised copy of the planned network trains a few hundred
iterations with nnU-Net's own training step and stock augmentation on the current x + delta of most cases, and is
scored (Dice, whole cases, sliding window) on the clean version of the cases it never saw. The same probe trained on
clean data, once, is the reference; their ratio is the run's headline signal (far below 1: the protection works on
fresh networks; about 1: it does not).
"""
from contextlib import contextmanager

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_voxshield.nnunet.scoring import case_predictor, cases_dice

HOLDOUT_EVERY = 5  # every 5th case (sorted) is held out from the probe's training and scored clean


def split(identifiers: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) cases of the probe; at least one of each."""
    ids = sorted(identifiers)
    held = ids[HOLDOUT_EVERY - 1::HOLDOUT_EVERY] or ids[-1:]
    return [i for i in ids if i not in held] or ids, held


class FreshProbe:
    """Trains and scores fresh networks for one surrogate trainer; `dataset(ids, perturbed)` gives nnU-Net datasets."""

    def __init__(self, trainer, dataset, iterations: int):
        self.trainer, self.dataset, self.iterations = trainer, dataset, iterations
        self.train_ids, self.heldout_ids = split(dataset(None, False).identifiers)
        clean = dataset(self.heldout_ids, False)
        self.heldout = [clean.load_case(i)[:2] for i in self.heldout_ids]
        self.reference = None

    def _batches(self, perturbed: bool):
        t = self.trainer
        rotation, dummy_2d, initial_patch, mirror_axes = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        patch = t.configuration_manager.patch_size
        transforms = t.get_training_transforms(
            patch, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=t.configuration_manager.use_mask_for_norm,
            is_cascaded=t.is_cascaded, foreground_labels=t.label_manager.foreground_labels,
            regions=t.label_manager.foreground_regions if t.label_manager.has_regions else None,
            ignore_label=t.label_manager.ignore_label)
        batch_size, oversample = t.global_batch
        return nnUNetDataLoader(self.dataset(self.train_ids, perturbed), batch_size, initial_patch, patch,
                                t.label_manager, oversample_foreground_percent=oversample, transforms=transforms)

    def dice(self, perturbed: bool, seed: int) -> float | None:
        """Train a fresh network on the (perturbed or clean) training cases; its Dice on the clean held-out cases."""
        t = self.trainer
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        network = t.fresh_network()
        optimizer = torch.optim.SGD(network.parameters(), t.initial_lr, weight_decay=t.weight_decay, momentum=0.99,
                                    nesterov=True)
        schedule = PolyLRScheduler(optimizer, t.initial_lr, self.iterations)
        batches = self._batches(perturbed)
        with _training(t, network, optimizer):
            for i in range(self.iterations):
                schedule.step(i)
                t.train_step(next(batches))
        network.eval()
        predictor = case_predictor(network, t.plans_manager, t.configuration_manager, t.dataset_json,
                                   type(t).__name__, t.device)
        return cases_dice(predictor, self.heldout, t.label_manager.foreground_labels)

    def measure(self, seed: int) -> dict:
        """The probe on the current perturbations, against the clean reference (trained once, same seed)."""
        if self.reference is None:
            self.reference = self.dice(False, seed)
        protected = self.dice(True, seed)
        ratio = None if not self.reference or protected is None else protected / self.reference
        return {"probe_dice_clean_heldout": protected, "probe_dice_clean_trained": self.reference,
                "probe_ratio": ratio, "probe_iterations": self.iterations, "probe_heldout_cases": self.heldout_ids}


@contextmanager
def _training(trainer, network, optimizer):
    """nnU-Net's own train_step, on the probe's network and optimiser for the duration of the block."""
    saved = trainer.network, trainer.optimizer
    trainer.network, trainer.optimizer = network, optimizer
    network.train()
    try:
        yield
    finally:
        trainer.network, trainer.optimizer = saved
