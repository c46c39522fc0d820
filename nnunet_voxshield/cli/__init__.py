"""Console entry points (`nnUNetv2_voxshield_*`): thin argparse front ends that share `cli.common` for one-line
errors, the -device flag and budget parsing, and import torch and nnU-Net only after their arguments parse.

May import every sub-package.
"""
