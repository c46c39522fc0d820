"""Design c on the stub surrogate of test_bilevel: one generator for every case keeps the budget and the region,
gives equal label maps equal deltas, follows its seed, lowers the surrogate's loss and resumes exactly."""
import copy

import numpy as np
import torch

from nnunet_voxshield.config import Schedule
from nnunet_voxshield.method.generator import GeneratorBilevel
from nnunet_voxshield.method.objectives import VoxShieldObjective
from test_bilevel import Dataset, Trainer, fixed_patch_loss, seg_loss, CaseState, SHAPE

EPS = 0.3


def make_generator_loop(seed=0, schedule=None, dataset=None):
    dataset, trainer = dataset or Dataset(), Trainer()
    cases, labels = [], {}
    for i, name in enumerate(dataset.identifiers):
        seg = dataset.cases[name][1][0]
        cases.append(CaseState(name, i, lambda d: d, torch.tensor([EPS]), torch.from_numpy(seg > 0), None, 0))
        labels[name] = torch.from_numpy(seg)
    schedule = schedule or Schedule(rounds=1, surrogate_iters=0, noise_steps=4, eot=False)
    return GeneratorBilevel(trainer, dataset, cases, VoxShieldObjective(seg_loss, 0.0, 0.0), schedule, seed=seed,
                            labels=labels, n_classes=3, n_channels=1)


def test_deltas_keep_the_budget_and_the_region_with_zero_mean_in_every_label():
    """On the stub the unconstrained optimum is one offset on all foreground (what the generator found first on the
    anatomy set): zero mean per label leaves a texture."""
    loop = make_generator_loop()
    loop.run_round(0, lambda case, x: None)
    seg = torch.from_numpy(loop.dataset.cases["a"][1][0])
    for case in loop.cases:
        assert 0.5 * EPS < float(case.delta.abs().max()) <= EPS + 1e-6
        assert not case.delta[:, ~case.mask].any()
        for label in (1, 2):
            assert abs(float(case.delta[0][seg == label].mean())) < 0.1 * EPS  # the clip to eps leaves a little


def test_equal_label_maps_get_equal_deltas():
    """Cases a and b of the stub share their label map but not their image: one generator, one code."""
    loop = make_generator_loop()
    published = {}
    loop.run_round(0, lambda case, x: published.__setitem__(case.identifier, x))
    a, b = loop.cases
    assert torch.equal(a.delta, b.delta)
    assert a.delta.abs().max() > 0
    assert np.array_equal(published["a"], published["b"]) and np.array_equal(published["a"], a.delta.numpy())


def test_same_seed_same_generator_other_seed_other():
    def deltas(seed):
        loop = make_generator_loop(seed, Schedule(rounds=1, surrogate_iters=0, noise_steps=2, eot=True))
        loop.run_round(0, lambda case, x: None)
        return loop.cases[0].delta.clone()
    assert torch.equal(deltas(0), deltas(0)) and not torch.equal(deltas(0), deltas(1))


def test_training_the_generator_lowers_the_surrogate_loss():
    loop = make_generator_loop(schedule=Schedule(rounds=1, surrogate_iters=0, noise_steps=25, eot=False))
    case = loop.cases[0]
    before = fixed_patch_loss(loop, case)
    loop.run_round(0, lambda case, x: None)
    trained, learnt = fixed_patch_loss(loop, case), case.delta.clone()
    case.delta = torch.zeros_like(learnt)
    clean = fixed_patch_loss(loop, case)
    case.delta = -learnt
    assert trained < min(before, clean) < fixed_patch_loss(loop, case)  # error-minimising, its opposite maximising


def test_state_dict_resumes_the_same_generator_and_optimiser():
    """A run restored from a committed round continues as the uninterrupted one (weights and Adam's moments)."""
    schedule = Schedule(rounds=2, surrogate_iters=0, noise_steps=2, eot=False)
    uninterrupted = make_generator_loop(schedule=schedule)
    uninterrupted.run_round(0, lambda case, x: None)
    saved = copy.deepcopy(uninterrupted.state_dict())
    uninterrupted.run_round(1, lambda case, x: None)

    resumed, restarted = make_generator_loop(schedule=schedule), make_generator_loop(schedule=schedule)
    resumed.load_state_dict(saved)
    for loop in (resumed, restarted):
        loop.run_round(1, lambda case, x: None)
    weights = lambda loop: torch.cat([p.detach().flatten() for p in loop.delta_net.parameters()])
    assert torch.allclose(weights(uninterrupted), weights(resumed), atol=1e-6)
    assert not torch.allclose(weights(uninterrupted), weights(restarted), atol=1e-4)
    assert all(torch.allclose(a.delta, b.delta, atol=1e-6) for a, b in zip(uninterrupted.cases, resumed.cases))
