"""Victims and adaptive attackers for `nnUNetv2_voxshield_evaluate` (any nnU-Net command can use them by name).

Full-schedule attackers are `nnUNetTrainerVS_<Attack>` (nnU-Net's 1000 x 250 schedule, for GPUs). Every victim also
exists with a short schedule, `nnUNetTrainerVS_<Tiny|Bench|Short|Long><Attack>`, e.g. nnUNetTrainerVS_Short (stock nnU-Net
augmentation), nnUNetTrainerVS_ShortNoDA (the paper's protocol), nnUNetTrainerVS_ShortSliceShuffle. The stock 2d
configuration (slices only) is a victim too: `-tr nnUNetTrainerVS_Short:2d` in the evaluation command.
The logic lives in nnunet_voxshield.victims: nnU-Net imports this file by name and forgets it after the lookup.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

from nnunet_voxshield import victims as v


class nnUNetTrainerVS_SliceShuffle(v.SliceShuffleAttack, nnUNetTrainer):
    """Attacker: slices of every training sample randomly permuted along z (image and labels together)."""


class nnUNetTrainerVS_SliceDropout(v.SliceDropoutAttack, nnUNetTrainer):
    """Attacker: each z-slice of every training sample zeroed with probability 0.25."""


class nnUNetTrainerVS_LowPassZ(v.LowPassZAttack, nnUNetTrainer):
    """Attacker: every training sample low-pass filtered along z (upper half of the z-spectrum removed)."""


class nnUNetTrainerVS_ResampleZ(v.ResampleZAttack, nnUNetTrainer):
    """Attacker: every training sample down-sampled 2x along z and back (thick-slice simulation)."""


class nnUNetTrainerVS_BlurInPlane(v.InPlaneBlurAttack, nnUNetTrainer):
    """Attacker: in-plane Gaussian blur (sigma 1 voxel) on every training sample."""


class nnUNetTrainerVS_Blur3D(v.Blur3DAttack, nnUNetTrainer):
    """Attacker: 3D Gaussian blur (sigma 1 voxel) on every training sample."""


class nnUNetTrainerVS_Median(v.MedianAttack, nnUNetTrainer):
    """Attacker: 3x3x3 median filter on every training sample."""


class nnUNetTrainerVS_ISS(v.ShortcutSqueezingAttack, nnUNetTrainer):
    """Attacker: ISS shortcut squeezing, 4-bit depth reduction then 3D Gaussian blur, on every training sample."""


class nnUNetTrainerVS_StrongIntensity(v.StrongIntensityAttack, nnUNetTrainer):
    """Attacker: strong, frequent intensity augmentation (noise, brightness, contrast, gamma, blur) on top of stock."""


VICTIMS = {
    "": (nnUNetTrainer, "Stock nnU-Net augmentation."),
    "NoDA": (nnUNetTrainerNoDA, "No data augmentation (the paper's protocol)."),
    "DA5": (nnUNetTrainerDA5, "nnU-Net's strong DA5 augmentation."),
    **{cls.__name__.removeprefix("nnUNetTrainerVS_"): (cls, cls.__doc__) for cls in (
        nnUNetTrainerVS_SliceShuffle, nnUNetTrainerVS_SliceDropout, nnUNetTrainerVS_LowPassZ,
        nnUNetTrainerVS_ResampleZ, nnUNetTrainerVS_BlurInPlane, nnUNetTrainerVS_Blur3D, nnUNetTrainerVS_Median,
        nnUNetTrainerVS_ISS, nnUNetTrainerVS_StrongIntensity)},
}

# nnU-Net finds trainers by attribute name on this module: publish nnUNetTrainerVS_<Tiny|Short|Long><victim>
globals().update(v.scheduled_variants(VICTIMS, __name__))
