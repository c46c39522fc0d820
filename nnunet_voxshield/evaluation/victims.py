"""Victims for the evaluation: short training schedules and adaptive attackers, as mixins for nnU-Net trainers.

An adaptive attacker knows VoxShield hides its shortcut in the slice-to-slice structure and the fine texture of the
images, and transforms every training sample to destroy exactly that before nnU-Net's own augmentation runs. The
transforms act on nnU-Net's training samples (torch tensors C, Z, Y, X in normalised units); "z" is the first spatial
axis of the patch, where nnU-Net puts the lowest-resolution (out-of-plane) axis, i.e. the slice axis. Attacks are
training-time only, as in the unlearnable-examples literature (ISS and friends): held-out scans stay clean.

The trainer classes themselves live in trainers/ (nnU-Net imports them by file name); this module holds their logic.
"""
import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform, blur_dimension
from batchgeneratorsv2.transforms.noise.median_filter import MedianFilterTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunet_voxshield.evaluation.diagnostics import DiagnosedTraining

Z = 1  # index of the slice axis in a sample tensor (C, Z, Y, X)


def _require_3d(img: torch.Tensor) -> None:
    if img.ndim != 4:
        raise ValueError(f"slice-axis attacks need 3D samples (C, Z, Y, X), got shape {tuple(img.shape)}; "
                         f"train them with a 3d configuration")


# ---------------------------------------------------------------- transforms on one training sample


class ShuffleSlices(BasicTransform):
    """Randomly permute the slices along z, image and labels alike: in-plane content is kept, 3D context is not."""

    def get_parameters(self, image: torch.Tensor, **kwargs) -> dict:
        _require_3d(image)
        return {"order": torch.randperm(image.shape[Z])}

    def _apply_to_image(self, img, order):
        return img[:, order]

    def _apply_to_segmentation(self, seg, order):
        return seg[:, order]


class DropSlices(ImageOnlyTransform):
    """Set each z-slice of the image to 0 (the z-score mean) with probability `rate`; labels stay, so the network
    must segment the missing slice from its neighbours."""

    def __init__(self, rate: float = 0.25):
        super().__init__()
        self.rate = rate

    def get_parameters(self, image: torch.Tensor, **kwargs) -> dict:
        _require_3d(image)
        return {"dropped": torch.rand(image.shape[Z]) < self.rate}

    def _apply_to_image(self, img, dropped):
        img = img.clone()
        img[:, dropped] = 0
        return img


class LowPassZ(ImageOnlyTransform):
    """Ideal low-pass along z: zero every z-frequency above `keep` x Nyquist; in-plane content is untouched."""

    def __init__(self, keep: float = 0.5):
        super().__init__()
        self.keep = keep

    def _apply_to_image(self, img, **params):
        _require_3d(img)
        n = img.shape[Z]
        spectrum = torch.fft.rfft(img, dim=Z)
        cutoff = int(np.floor(self.keep * (n // 2))) + 1  # bins 0..cutoff-1 survive
        spectrum[:, cutoff:] = 0
        return torch.fft.irfft(spectrum, n=n, dim=Z)


class ResampleZ(ImageOnlyTransform):
    """Down-sample along z by `factor` (linear, i.e. averaging neighbouring slices) and back to the original number
    of slices, as if the scan had been acquired with thicker slices."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def _apply_to_image(self, img, **params):
        _require_3d(img)
        z, y, x = img.shape[1:]
        low = F.interpolate(img[None], size=(max(1, z // self.factor), y, x), mode="trilinear", align_corners=False)
        return F.interpolate(low, size=(z, y, x), mode="trilinear", align_corners=False)[0]


class AxisGaussianBlur(ImageOnlyTransform):
    """Gaussian blur with a fixed sigma along the given spatial axes only (0 = z), via batchgeneratorsv2's kernel."""

    def __init__(self, sigma: float, axes: tuple[int, ...]):
        super().__init__()
        self.sigma = sigma
        self.axes = axes

    def _apply_to_image(self, img, **params):
        for axis in self.axes:
            img = blur_dimension(img, self.sigma, axis)
        return img


class QuantiseBits(ImageOnlyTransform):
    """Bit-depth reduction: round each channel to 2**bits levels spanning that channel's own min..max."""

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = bits

    def _apply_to_image(self, img, **params):
        spatial = tuple(range(1, img.ndim))
        lo = img.amin(dim=spatial, keepdim=True)
        step = (img.amax(dim=spatial, keepdim=True) - lo).clamp_min(1e-8) / (2 ** self.bits - 1)
        return torch.round((img - lo) / step) * step + lo


def shortcut_squeezing(bits: int = 4, sigma: float = 1.0) -> BasicTransform:
    """ISS-style shortcut squeezing (Liu et al., ICML 2023): bit-depth reduction, then a 3D Gaussian blur."""
    return ComposeTransforms([QuantiseBits(bits), AxisGaussianBlur(sigma, (0, 1, 2))])


def strong_intensity() -> BasicTransform:
    """Intensity augmentation far stronger and more frequent than stock nnU-Net's (which applies these with
    p = 0.1 to 0.3 and ranges 0.75 to 1.25): noise, brightness, contrast, gamma and blur, each with p >= 0.3."""
    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.3), p_per_channel=1, synchronize_channels=False),
                        apply_probability=0.5),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.5, 1.5)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.5),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.5, 1.5)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.5),
        RandomTransform(GammaTransform(gamma=BGContrast((0.5, 2.0)), p_invert_image=0.2, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.5),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.5), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1), apply_probability=0.3),
    ])


# ---------------------------------------------------------------- trainer mixins


class TrainingSampleAttack:
    """Trainer mixin: run `attack()` on every training sample before the trainer's own augmentation pipeline.

    nnU-Net declares get_training_transforms static but always calls it through the instance, so an instance method
    here can read the attack's settings and still defer to whatever pipeline the base trainer builds (stock, NoDA,
    DA5). Validation and inference are untouched.
    """

    def attack(self) -> BasicTransform:
        raise NotImplementedError

    def get_training_transforms(self, *args, **kwargs) -> BasicTransform:
        attack = self.attack()
        self.print_to_log_file(f"attack on every training sample, before augmentation: {attack}")
        return ComposeTransforms([attack, super().get_training_transforms(*args, **kwargs)])


class SliceShuffleAttack(TrainingSampleAttack):
    def attack(self):
        return ShuffleSlices()


class SliceDropoutAttack(TrainingSampleAttack):
    slice_dropout_rate = 0.25

    def attack(self):
        return DropSlices(self.slice_dropout_rate)


class LowPassZAttack(TrainingSampleAttack):
    lowpass_keep = 0.5

    def attack(self):
        return LowPassZ(self.lowpass_keep)


class ResampleZAttack(TrainingSampleAttack):
    resample_factor = 2

    def attack(self):
        return ResampleZ(self.resample_factor)


class InPlaneBlurAttack(TrainingSampleAttack):
    blur_sigma = 1.0

    def attack(self):
        return AxisGaussianBlur(self.blur_sigma, (1, 2))


class Blur3DAttack(TrainingSampleAttack):
    blur_sigma = 1.0

    def attack(self):
        return AxisGaussianBlur(self.blur_sigma, (0, 1, 2))


class MedianAttack(TrainingSampleAttack):
    median_size = 3

    def attack(self):
        return MedianFilterTransform(self.median_size, p_per_channel=1.0)


class ShortcutSqueezingAttack(TrainingSampleAttack):
    squeeze_bits = 4
    squeeze_sigma = 1.0

    def attack(self):
        return shortcut_squeezing(self.squeeze_bits, self.squeeze_sigma)


class StrongIntensityAttack(TrainingSampleAttack):
    def attack(self):
        return strong_intensity()


STOCK_VICTIMS = {
    "nnUNetTrainer": "Stock nnU-Net augmentation.",
    "nnUNetTrainerNoDA": "No data augmentation (the paper's protocol).",
    "nnUNetTrainerDA5": "nnU-Net's strong DA5 augmentation.",
}
"""nnU-Net's own trainers that serve as victims, with what they do."""


class TrainingSchedule(DiagnosedTraining):
    """Trainer mixin fixing the number of epochs and iterations (nnU-Net's default is 1000 x 250), and recording the
    shortcut diagnostics when the evaluation asks for them (`evaluation.diagnostics`).

    `class nnUNetTrainerVS_<Schedule><Victim>(<Schedule>Schedule, <victim trainer>)` gets, unless it has its own,
    the docstring "<what the victim does> <what the schedule is>". A schedule is part of the trainer's name and
    therefore of its nnU-Net results folder: runs of different lengths never mix.
    """
    schedule_name = ""
    schedule_epochs = 1000
    schedule_iterations = 250
    schedule_val_iterations = 50
    skip_final_validation = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__doc__ is None and len(cls.__bases__) == 2 and issubclass(cls.__bases__[0], TrainingSchedule):
            schedule, victim = cls.__bases__
            cls.__doc__ = f"{STOCK_VICTIMS.get(victim.__name__, victim.__doc__)} {schedule.__doc__}"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.schedule_epochs
        self.num_iterations_per_epoch = self.schedule_iterations
        self.num_val_iterations_per_epoch = self.schedule_val_iterations

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skipped for CPU schedules: nnU-Net's cross-validation prediction would cost more than the training, and
        the evaluation predicts its own held-out cases anyway."""
        if not self.skip_final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"{self.schedule_name} schedule: final validation skipped")


class TinySchedule(TrainingSchedule):
    """2 epochs x 5 iterations: plumbing tests only, the network learns nothing."""
    schedule_name, schedule_epochs, schedule_iterations, schedule_val_iterations = "Tiny", 2, 5, 1
    skip_final_validation = True


class BenchSchedule(TrainingSchedule):
    """20 epochs x 25 iterations: the CPU efficacy benchmark on the 4 mm demo brain (about 10 minutes a run)."""
    schedule_name, schedule_epochs, schedule_iterations, schedule_val_iterations = "Bench", 20, 25, 2
    skip_final_validation = True


class ShortSchedule(TrainingSchedule):
    """50 epochs x 20 iterations: CPU experiments on 32^3 to 48^3 toy datasets (minutes)."""
    schedule_name, schedule_epochs, schedule_iterations, schedule_val_iterations = "Short", 50, 20, 5


class Short4xSchedule(TrainingSchedule):
    """200 epochs x 20 iterations: the Short schedule 4x longer, the check that a protection is no mere slowdown."""
    schedule_name, schedule_epochs, schedule_iterations, schedule_val_iterations = "Short4x", 200, 20, 5


class LongSchedule(TrainingSchedule):
    """100 epochs x 50 iterations: when Short leaves the clean victim below a useful Dice."""
    schedule_name, schedule_epochs, schedule_iterations, schedule_val_iterations = "Long", 100, 50, 10


SCHEDULES = (TinySchedule, BenchSchedule, ShortSchedule, Short4xSchedule, LongSchedule)
