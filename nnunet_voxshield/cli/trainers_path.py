"""`nnUNetv2_voxshield_trainers_path`: print the folder to put in nnUNet_extTrainer."""
from nnunet_voxshield.nnunet.env import trainers_dir


def main():
    print(trainers_dir())
