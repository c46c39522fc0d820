"""code_survival's measure on a tiny case: nnU-Net's intensity transforms and mirroring keep the label codes
(axial gratings and parity codes), and the measure sees it when a code does not survive (a diagonal grating under
mirroring)."""
import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from code_survival import MIRROR_AXES, ROTATION, attacks, mean_measured, shifted_code, survival, transforms
from nnunet_voxshield.method.baselines import layered_code, method_gratings

SHAPE = (24, 24, 24)
DRAWS = 6


def tiny_case(layers):
    """A smooth image with two labels, and +-0.2 times the code on them."""
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[4:12, 4:20, 4:20], labels[12:20, 4:20, 4:20] = 1, 2
    grid = np.meshgrid(*[np.linspace(0, 1, s) for s in SHAPE], indexing="ij")
    x = torch.from_numpy((np.sin(3 * grid[0]) + grid[1] * grid[2] + 1.0).astype(np.float32))[None]
    code = shifted_code(layers)
    d = torch.from_numpy(0.2 * layered_code(labels, layers)).float()[None]
    return x, d, torch.from_numpy(labels)[None], code


def measured(layers, name, amplitude=False):
    """Survival (or, with `amplitude`, the amplitude kept) of the code under step `name` in each draw."""
    x, d, seg, code = tiny_case(layers)
    steps = {t_name: (t, spatial) for t_name, t, spatial in [
        *transforms(nnUNetTrainer, SHAPE, ROTATION, MIRROR_AXES), *attacks(["Blur3D", "Median"])]}
    transform, spatial = steps[name]
    return [survival(transform, spatial, x, d, seg, seed, code)[int(amplitude)] for seed in range(DRAWS)]


@pytest.mark.parametrize("method", ["codes", "parity", "twoscale"])
@pytest.mark.parametrize("name", ["Mirror", "GaussianNoise", "MultiplicativeBrightness", "Contrast", "Gamma"])
def test_label_codes_survive_intensity_transforms_and_mirroring(method, name):
    assert min(measured(method_gratings(method, [1, 2], seed=0), name)) > 0.98


def test_a_diagonal_grating_does_not_survive_mirroring():
    diagonal = {k: (np.array([1.0, 1.0, 0.0]) / np.sqrt(2), 4.0, 0.3) for k in (1, 2)}
    assert min(measured([(1.0, diagonal)], "Mirror")) < 0.5


def test_a_blur_keeps_the_presence_gratings_shape_but_not_its_strength_and_noise_keeps_both():
    presence = method_gratings("presence", [1, 2], seed=0)
    assert min(measured(presence, "attack Blur3D")) > 0.9
    assert max(measured(presence, "attack Blur3D", amplitude=True)) < 0.5  # period 4, sigma 1: about 0.3
    np.testing.assert_allclose(measured(presence, "GaussianNoise", amplitude=True), 1.0, atol=1e-4)


def test_an_unknown_attacker_is_refused_with_the_names_to_choose_from():
    with pytest.raises(SystemExit, match="ISS"):
        attacks(["Sharpen"])



def test_a_step_no_draw_could_measure_is_null_in_the_report_not_nan():
    assert mean_measured([float("nan"), float("nan")]) is None
    assert mean_measured([0.5, float("nan"), 0.7]) == pytest.approx(0.6)
