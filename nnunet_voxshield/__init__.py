"""VoxShield: unlearnable examples for 3D medical datasets, as an nnU-Net v2 plugin."""
__version__ = "0.1.0"
