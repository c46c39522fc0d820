"""The VoxShield surrogate, findable by name so `nnUNetv2_predict -tr nnUNetTrainerVoxShieldSurrogate -f all` works."""
from nnunet_voxshield.nnunet.surrogate import nnUNetTrainerVoxShieldSurrogate  # noqa: F401
