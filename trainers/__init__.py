"""nnU-Net trainer classes of VoxShield, found by nnU-Net through `nnUNet_extTrainer`.

Point nnU-Net here with `export nnUNet_extTrainer=$(nnUNetv2_voxshield_trainers_path)`. Each file stays thin: nnU-Net
imports it by file name and drops it after the lookup, so the logic lives in the installed `nnunet_voxshield` package.
"""
