"""Console entry points (`nnUNetv2_voxshield_*`)."""
