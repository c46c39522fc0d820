"""The bilevel loop on a stub surrogate: the noise step minimises the loss within the budget and ROI, a seed fixes
every draw, and a round trains the surrogate and reports what it measured."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_voxshield.config import Schedule
from nnunet_voxshield.method.bilevel import Bilevel, CaseState
from nnunet_voxshield.method.objectives import VoxShieldObjective

SHAPE, PATCH = (12, 12, 12), (8, 8, 8)


class Dataset:
    """Two cases of nnU-Net's preprocessed form: data [1, ...], seg [1, ...] and class locations."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.cases = {}
        for name in ("a", "b"):
            seg = np.zeros((1, *SHAPE), dtype=np.int16)
            seg[0, 3:9, 3:9, 3:9] = 1
            seg[0, 5:7, 5:7, 5:7] = 2
            data = (rng.normal(size=(1, *SHAPE)) + seg).astype(np.float32)
            locations = {c: np.argwhere(seg == c) for c in (1, 2)}
            self.cases[name] = (data, seg, None, {"class_locations": locations})
        self.identifiers = sorted(self.cases)

    def load_case(self, identifier):
        return self.cases[identifier]


class Trainer:
    """What Bilevel uses of nnU-Net's surrogate trainer."""

    def __init__(self):
        torch.manual_seed(0)
        self.network = self.plain_network = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.device = torch.device("cpu")
        self.configuration_manager = SimpleNamespace(patch_size=list(PATCH))
        self.global_batch = (2, 0.5)
        self.label_manager = LabelManager({"background": 0, "x": 1, "y": 2}, None)
        self.lr_steps, self.reinitialised = [], []
        self.lr_scheduler = SimpleNamespace(step=self.lr_steps.append)
        self.steps = 0

    def reinitialise(self, seed):
        self.reinitialised.append(seed)

    def train_step(self, batch):
        self.steps += 1
        return {"loss": 0.5}

    @property
    def dataloader_train(self):
        return iter([None] * 100)


def seg_loss(logits, target):
    return F.cross_entropy(logits, target[:, 0].long())


def make_loop(seed=0, schedule=None, lambda_z=0.0, lambda_s=0.0):
    dataset, trainer = Dataset(), Trainer()
    eps = torch.tensor([0.3])
    cases = []
    for i, name in enumerate(dataset.identifiers):
        mask = torch.from_numpy(dataset.cases[name][1][0] > 0)
        cases.append(CaseState(name, i, lambda d: d, eps, mask, torch.zeros(1, *SHAPE), slice_axis=0))
    schedule = schedule or Schedule(rounds=1, surrogate_iters=3, noise_steps=3, step_size=0.5, eot=False)
    return Bilevel(trainer, dataset, cases, VoxShieldObjective(seg_loss, lambda_z, lambda_s), schedule, seed=seed)


def fixed_patch_loss(loop, case):
    data, seg, *_ = loop.dataset.load_case(case.identifier)
    x, y = torch.from_numpy(data)[None], torch.from_numpy(seg)[None]
    with torch.no_grad():
        return float(seg_loss(loop.net(x + case.delta[None]), y))


def test_noise_step_lowers_the_surrogate_loss():
    loop = make_loop()
    case = loop.cases[0]
    before = fixed_patch_loss(loop, case)
    for r in range(4):
        data, seg, _, props = loop.dataset.load_case(case.identifier)
        loop.noise_update(case, r, (torch.from_numpy(data), torch.from_numpy(seg), props))
    optimised = fixed_patch_loss(loop, case)
    case.delta = torch.empty_like(case.delta).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(0)) \
        * case.mask
    assert optimised < before - 0.01  # error-minimising: the perturbed case is easier for the surrogate
    assert optimised < fixed_patch_loss(loop, case) - 0.01  # ... than with random noise of the same budget



def test_noise_step_stays_within_budget_and_roi():
    loop = make_loop()
    loop.run_round(0, lambda case, x: None)
    for case in loop.cases:
        assert 0.29 < float(case.delta.abs().max()) <= 0.3 + 1e-6
        assert not case.delta[:, ~case.mask].any()


def test_free_band_moves_only_its_voxels_and_keeps_the_start_elsewhere():
    from nnunet_voxshield.method.budget import boundary_band
    loop = make_loop()
    start = {}
    for case in loop.cases:
        case.delta = 0.3 * case.mask.float()[None]  # a code at +eps on every labelled voxel
        start[case.identifier] = case.delta.clone()
        case.free = torch.from_numpy(boundary_band(loop.dataset.load_case(case.identifier)[1][0], 1))
    loop.run_round(0, lambda case, x: None)
    for case in loop.cases:
        moved = case.delta != start[case.identifier]
        assert moved.any() and not moved[:, ~case.free].any()
        assert not case.delta[:, ~case.mask].any()


def test_same_seed_same_deltas_other_seed_other_deltas():
    def deltas(seed):
        loop = make_loop(seed, Schedule(rounds=1, surrogate_iters=0, noise_steps=2, step_size=0.5, eot=True))
        loop.run_round(0, lambda case, x: None)
        return [c.delta.clone() for c in loop.cases]
    a, b, c = deltas(0), deltas(0), deltas(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, z) for x, z in zip(a, c))


def test_round_trains_the_surrogate_publishes_every_case_and_reports():
    loop = make_loop(lambda_z=0.2, lambda_s=0.05)
    published = {}
    record = loop.run_round(0, lambda case, x: published.__setitem__(case.identifier, x))
    assert loop.trainer.steps == 3
    assert sorted(published) == ["a", "b"] and published["a"].shape == (1, *SHAPE)
    assert record["round"] == 1 and record["surrogate_train_loss"] == pytest.approx(0.5)
    for key in ("seg", "zdiv", "spd", "ce_perturbed", "ce_clean", "ratio"):
        assert np.isfinite(record[key]), key
    assert record["ratio"] == pytest.approx(record["ce_perturbed"] / record["ce_clean"])


def test_reinit_every_starts_the_surrogate_over_with_a_seeded_draw_and_a_fresh_schedule():
    def rounds(seed, every):
        loop = make_loop(seed, Schedule(rounds=5, surrogate_iters=1, noise_steps=1, reinit_every=every, eot=False))
        for r in range(5):
            loop.surrogate_steps(r)
        return loop.trainer
    trainer = rounds(0, 2)
    assert len(trainer.reinitialised) == 2 and trainer.lr_steps == [0, 1, 0, 1, 0]  # before rounds 3 and 5
    assert rounds(0, 2).reinitialised == trainer.reinitialised != rounds(1, 2).reinitialised
    never = rounds(0, 0)
    assert never.reinitialised == [] and never.lr_steps == [0, 1, 2, 3, 4]
