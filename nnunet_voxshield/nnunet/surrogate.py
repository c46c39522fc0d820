"""The surrogate: nnU-Net's own planned network and training step, trained only on x + delta.

The trainer is stock nnUNetTrainer except that every case it loads carries the current perturbation. Perturbations
are read from files (one `.npy` per case, already on the preprocessed grid) at every load, so nnU-Net's augmentation
worker processes (nnUNet_n_proc_DA > 0) always see the latest round's delta without sharing memory.

nnU-Net's augmentation workers are daemon processes, which Python ends only when the parent exits normally. A parent
killed with SIGKILL (the kernel's out-of-memory killer does that) would leave them running, holding their memory. So
every worker asks the kernel to kill it when its parent dies (Linux's parent-death signal), and exits by itself when
it finds its parent gone (other systems, or a parent that died before the request).
"""
import ctypes
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch.nn.parallel import DistributedDataParallel

from nnunet_voxshield.errors import VoxShieldError


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: be killed when `parent_pid` dies; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl (not Linux): the check below still runs at every case
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


class PerturbedDataset:
    """Wraps an nnU-Net dataset; `load_case` returns data + the case's perturbation file (if any).

    `load_case` runs in nnU-Net's augmentation workers, so it is also where a worker ties its life to its parent.
    """

    def __init__(self, base, perturbation_folder: Path):
        self.base = base
        self.identifiers = base.identifiers
        self.perturbation_folder = Path(perturbation_folder)
        self.parent_pid = os.getpid()
        self._tied_pid = os.getpid()

    def __getattr__(self, name):
        return getattr(self.base, name)

    def load_case(self, identifier):
        if os.getpid() != self._tied_pid:  # first load in a new worker process
            die_with_parent(self.parent_pid)
            self._tied_pid = os.getpid()
        data, seg, seg_prev, properties = self.base.load_case(identifier)
        f = self.perturbation_folder / f"{identifier}.npy"
        if f.is_file():
            data = np.asarray(data, dtype=np.float32) + np.load(f)
        return data, seg, seg_prev, properties

    __getitem__ = load_case


class nnUNetTrainerVoxShieldSurrogate(nnUNetTrainer):
    """nnU-Net trainer whose training data is the perturbed dataset x + delta.

    Deep supervision is off: the noise step needs one full-resolution output, and training the surrogate with the
    same single-output loss keeps both levels of the bilevel problem on the same objective.

    Under torch.distributed (`-num_gpus N`) the surrogate trains with DDP like nnU-Net's own multi-GPU training,
    but also on CPU processes (gloo), which stock nnU-Net does not allow; see `initialize`.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type != "cuda":
            self.device = device  # nnU-Net assumes DDP means CUDA; gloo ranks run on the CPU
        self.enable_deep_supervision = False
        self.perturbation_folder = Path(self.output_folder) / "perturbed_inputs"
        self.save_every = 10 ** 9  # the bilevel loop checkpoints itself, together with the perturbations

    def initialize(self):
        """Build network, optimiser and loss as a single process would, then wrap the network in DDP.

        The loss is built without DDP on purpose: the noise step evaluates it on each rank's own cases, where a loss
        that gathers across ranks would wait for ranks that are busy with other cases. The data loader's batch
        (`batch_size`, `oversample_foreground_percent`) is then split over the ranks as nnU-Net does, and
        `global_batch` keeps the planned one for the noise step's patches.
        """
        if self.was_initialized:
            return
        ddp, self.is_ddp = self.is_ddp, False
        super().initialize()
        self.is_ddp = ddp
        self.global_batch = (self.batch_size, self.oversample_foreground_percent)
        if ddp:  # the lower-resolution heads get no gradient with deep supervision off: DDP must expect that
            self._set_batch_size_and_oversample()
            self.network = DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

    @property
    def plain_network(self) -> torch.nn.Module:
        """The network without its DDP wrapper: input gradients must not trigger DDP's gradient all-reduce."""
        return self.network.module if isinstance(self.network, DistributedDataParallel) else self.network

    def fresh_network(self) -> torch.nn.Module:
        """A newly initialised copy of the planned network (nnU-Net's own builder and initialisation), no DDP."""
        return self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                               self.num_input_channels, self.label_manager.num_segmentation_heads,
                                               self.enable_deep_supervision).to(self.device)

    def reinitialise(self, seed: int) -> None:
        """Start the surrogate over: fresh weights drawn from `seed` (the same on every rank) and a new optimiser."""
        torch.manual_seed(seed)
        self.plain_network.load_state_dict(self.fresh_network().state_dict())
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def load_weights(self, checkpoint: str) -> None:
        """Every weight of an nnU-Net checkpoint of the same plans, segmentation heads included.

        nnU-Net's `load_pretrained_weights` skips the heads (it is made for fine-tuning on other labels); a warm
        start, and above all the clean network that `--method targeted` attacks, needs the network as trained.
        """
        if not Path(checkpoint).is_file():
            raise VoxShieldError(f"--warm-start {checkpoint}: no such checkpoint file")
        try:
            weights = torch.load(checkpoint, map_location=self.device, weights_only=False)["network_weights"]
            self.plain_network.load_state_dict(weights)
        except (RuntimeError, KeyError, TypeError, pickle.UnpicklingError, EOFError):
            raise VoxShieldError(f"--warm-start {checkpoint} is not a checkpoint of this dataset's planned "
                                 f"{self.configuration_name} network; use one trained with the same plans") from None

    def get_tr_and_val_datasets(self):
        tr, val = super().get_tr_and_val_datasets()
        return PerturbedDataset(tr, self.perturbation_folder), PerturbedDataset(val, self.perturbation_folder)

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        """nnU-Net's training log goes to the log file only: the protect command shows its own progress."""
        super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

    def plot_network_architecture(self):
        """Skipped: it needs hiddenlayer/graphviz and adds nothing to a protection run."""
