"""The adaptive attackers do what their names promise, on arrays, and nnU-Net finds every victim trainer by name."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_voxshield.evaluation import victims as v
from nnunet_voxshield.nnunet.env import ext_trainers_visible, trainers_dir

SHAPE = (2, 12, 10, 8)  # C, Z, Y, X


def sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(SHAPE, generator=g)
    seg = torch.randint(0, 3, (1, *SHAPE[1:]), generator=g).to(torch.int16)
    return {"image": image, "segmentation": seg}


def apply(transform, data):
    return transform(**{k: t.clone() for k, t in data.items()})


def in_plane_image(seed=1):
    """Varies in-plane only (every z-slice identical)."""
    return torch.randn(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(seed)).expand(SHAPE).clone()


def z_only_image(seed=2):
    """Varies along z only (every slice constant)."""
    return torch.randn(SHAPE[0], SHAPE[1], 1, 1, generator=torch.Generator().manual_seed(seed)).expand(SHAPE).clone()


def test_shuffle_permutes_whole_slices_along_z_only_and_labels_follow():
    torch.manual_seed(3)
    data = sample()
    out = apply(v.ShuffleSlices(), data)
    assert out["image"].shape == SHAPE and out["segmentation"].shape == data["segmentation"].shape
    # every output slice is an intact input slice, each input slice used once, the same permutation for the labels
    order = [next(j for j in range(SHAPE[1]) if torch.equal(out["image"][:, i], data["image"][:, j]))
             for i in range(SHAPE[1])]
    assert sorted(order) == list(range(SHAPE[1])) and order != list(range(SHAPE[1]))
    assert torch.equal(out["segmentation"], data["segmentation"][:, order])


def test_slice_dropout_zeroes_whole_slices_and_keeps_the_rest():
    torch.manual_seed(0)
    data = sample()
    out = apply(v.DropSlices(rate=0.5), data)
    dropped = [z for z in range(SHAPE[1]) if not torch.equal(out["image"][:, z], data["image"][:, z])]
    assert 0 < len(dropped) < SHAPE[1]
    assert all(torch.all(out["image"][:, z] == 0) for z in dropped)
    assert torch.equal(out["segmentation"], data["segmentation"])


def test_lowpass_z_removes_high_z_frequencies_and_keeps_in_plane_content():
    lowpass = v.LowPassZ(keep=0.5)
    flat = in_plane_image()
    assert torch.allclose(apply(lowpass, {"image": flat})["image"], flat, atol=1e-5)
    out = apply(lowpass, sample())["image"]
    spectrum = torch.fft.rfft(out, dim=1).abs()
    n_keep = SHAPE[1] // 2 // 2 + 1
    assert spectrum[:, n_keep:].max() < 1e-4 and spectrum[:, :n_keep].max() > 0.1


def test_resample_z_averages_out_slice_alternation_and_keeps_in_plane_content():
    flat = in_plane_image()
    alternating = torch.tensor([(-1.0) ** z for z in range(SHAPE[1])]).view(1, -1, 1, 1)
    out = apply(v.ResampleZ(2), {"image": flat + 0.5 * alternating})["image"]
    assert out.shape == SHAPE
    assert torch.allclose(out, flat, atol=1e-5)  # the Nyquist pattern along z is gone, in-plane detail is not


@pytest.mark.parametrize("axes,kept,smoothed", [((1, 2), z_only_image, in_plane_image),
                                                ((0, 1, 2), None, z_only_image)])
def test_gaussian_blur_acts_on_its_axes_only(axes, kept, smoothed):
    blur = v.AxisGaussianBlur(1.0, axes)
    if kept is not None:  # in-plane blur leaves an image that varies only along z untouched
        assert torch.allclose(apply(blur, {"image": kept()})["image"], kept(), atol=1e-5)
    x = smoothed()
    out = apply(blur, {"image": x})["image"]
    assert out.shape == SHAPE and out.var() < 0.6 * x.var()


def test_median_removes_an_isolated_spike():
    x = torch.zeros(SHAPE)
    x[0, 5, 5, 4] = 10.0
    out = apply(v.MedianAttack().attack(), {"image": x})["image"]
    assert out.shape == SHAPE and torch.all(out == 0)


def test_bit_depth_reduction_leaves_few_levels_within_half_a_step():
    x = sample()["image"]
    out = apply(v.QuantiseBits(3), {"image": x})["image"]
    for c in range(SHAPE[0]):
        assert len(torch.unique(out[c])) <= 8
        step = (x[c].max() - x[c].min()) / 7
        assert (out[c] - x[c]).abs().max() <= step / 2 + 1e-5


def test_shortcut_squeezing_erases_a_small_perturbation_on_a_smooth_image():
    smooth = v.AxisGaussianBlur(2.0, (0, 1, 2))(image=sample()["image"] * 5)["image"]
    delta = 0.02 * (smooth.max() - smooth.min()) * torch.sign(torch.randn(SHAPE, generator=torch.Generator()
                                                                           .manual_seed(4)))
    squeeze = v.shortcut_squeezing(bits=4, sigma=1.0)
    clean, perturbed = squeeze(image=smooth.clone())["image"], squeeze(image=(smooth + delta).clone())["image"]
    # what survives is far smaller than the perturbation itself (quantisation snaps it away, blur averages the rest)
    assert (perturbed - clean).abs().mean() < 0.5 * delta.abs().mean()


def test_strong_intensity_changes_the_image_only():
    torch.manual_seed(0)
    np.random.seed(0)
    data = sample()
    changed = 0
    for _ in range(5):
        out = apply(v.strong_intensity(), data)
        assert out["image"].shape == SHAPE and torch.equal(out["segmentation"], data["segmentation"])
        changed += not torch.allclose(out["image"], data["image"])
    assert changed >= 3


def test_slice_attacks_refuse_2d_samples_with_a_clear_message():
    with pytest.raises(ValueError, match="3d configuration"):
        v.ShuffleSlices()(image=torch.zeros(1, 8, 8), segmentation=torch.zeros(1, 8, 8))


ATTACKS = {"SliceShuffle": v.ShuffleSlices, "SliceDropout": v.DropSlices, "LowPassZ": v.LowPassZ,
           "ResampleZ": v.ResampleZ, "BlurInPlane": v.AxisGaussianBlur, "Blur3D": v.AxisGaussianBlur,
           "Median": v.MedianFilterTransform, "ISS": v.ComposeTransforms, "StrongIntensity": v.ComposeTransforms}


@pytest.fixture(scope="module")
def victims_module():
    """The trainers file, loaded the way nnU-Net loads it: by file name, from the nnUNet_extTrainer folder."""
    path = Path(trainers_dir()) / "nnUNetTrainerVoxShieldVictims.py"
    spec = importlib.util.spec_from_file_location("nnUNetTrainerVoxShieldVictims", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scheduled_trainers_are_exactly_victims_times_schedules(victims_module):
    """The classes written out one per line are the table VICTIMS x SCHEDULES, no more, no fewer, right bases."""
    table = {f"nnUNetTrainerVS_{s.schedule_name}{suffix}": (s, victim)
             for s in v.SCHEDULES for suffix, (victim, _) in victims_module.VICTIMS.items()}
    scheduled = {name: cls for name, cls in vars(victims_module).items()
                 if isinstance(cls, type) and issubclass(cls, v.TrainingSchedule)}
    assert set(scheduled) == set(table) and len(table) == 5 * 12
    for name, cls in scheduled.items():
        assert cls.__bases__ == table[name], name
        assert cls.__doc__.endswith(table[name][0].__doc__)


@pytest.mark.parametrize("attack", ["", "NoDA", "DA5", *ATTACKS])
def test_every_victim_exists_per_schedule_and_attacks_before_augmentation(victims_module, attack):
    for schedule in v.SCHEDULES:
        cls = getattr(victims_module, f"nnUNetTrainerVS_{schedule.schedule_name}{attack}")
        assert issubclass(cls, schedule) and cls.__doc__
        assert issubclass(cls, v.TrainingSampleAttack) == (attack in ATTACKS)
    if attack in ATTACKS:
        trainer = cls.__new__(cls)  # the transform pipeline needs no plans
        trainer.print_to_log_file = lambda *args, **kwargs: None
        pipeline = trainer.get_training_transforms((12, 10, 8), (0.0, 0.0), None, (0, 1, 2), False)
        assert isinstance(pipeline.transforms[0], ATTACKS[attack])
        out = pipeline(**sample())  # attack, then stock augmentation, on a 3D sample
        assert out["image"].shape == SHAPE


def test_nnunet_finds_victims_by_name(monkeypatch, tmp_path):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA
    with ext_trainers_visible():
        assert issubclass(recursive_find_trainer_class_by_name("nnUNetTrainerVS_ShortNoDA"), nnUNetTrainerNoDA)
        tiny = recursive_find_trainer_class_by_name("nnUNetTrainerVS_TinySliceShuffle")
    assert (tiny.schedule_epochs, tiny.schedule_iterations) == (2, 5)
    assert "nnUNet_extTrainer" not in os.environ  # the caller's environment is left as it was
