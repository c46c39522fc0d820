"""Checkpoints of the bilevel loop: surrogate, optimiser and perturbations, one consistent set per round.

Each round writes `round_NNNN.pth` (nnU-Net's own trainer checkpoint) and `round_NNNN_state.pth` (the deltas), then
commits by atomically rewriting `voxshield_run.json` (settings and history); files of older rounds are removed after
the commit. A run killed at any point resumes from the last committed round. No random state is stored: the loop
reseeds from (seed, round, ...) wherever it draws (`bilevel.reseed`).
"""
import hashlib
import json
from pathlib import Path

import torch

from nnunet_voxshield.atomic import atomic_write, save_json
from nnunet_voxshield.errors import VoxShieldError

RUN_FILE = "voxshield_run.json"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    """The committed progress of one protection run in the surrogate trainer's output folder."""

    def __init__(self, folder: Path, settings: dict | None = None):
        """`settings` are those of the run about to start; None only reads what is committed."""
        self.folder = Path(folder)
        self.settings = settings
        self.key = None if settings is None else fingerprint(settings)
        f = self.folder / RUN_FILE
        self.committed = json.loads(f.read_text()) if f.is_file() else None

    def check_compatible(self, overwrite: bool) -> None:
        if self.committed and self.committed["fingerprint"] != self.key:
            if not overwrite:
                raise VoxShieldError(f"{self.folder} holds a run with other settings; rerun with the same settings "
                                     f"to resume it, or add --overwrite to discard it")
            self.discard()

    def discard(self) -> None:
        for f in self.folder.glob("round_*.pth"):
            f.unlink()
        (self.folder / RUN_FILE).unlink(missing_ok=True)
        self.committed = None

    @property
    def rounds_done(self) -> int:
        return self.committed["rounds_done"] if self.committed else 0

    @property
    def history(self) -> list:
        return list(self.committed["history"]) if self.committed else []

    def save(self, trainer, rounds_done: int, deltas: dict, history: list, finished: bool) -> None:
        tag = f"round_{rounds_done:04d}"
        trainer.current_epoch = rounds_done - 1  # nnU-Net stores current_epoch + 1
        atomic_write(self.folder / f"{tag}.pth", trainer.save_checkpoint, suffix=".pth")
        state = {"deltas": {str(k): v.cpu() for k, v in deltas.items()}}
        atomic_write(self.folder / f"{tag}_state.pth", lambda t: torch.save(state, t), suffix=".pth")
        self.committed = {"fingerprint": self.key, "settings": self.settings, "rounds_done": rounds_done,
                          "history": history, "finished": finished}
        save_json(self.committed, self.folder / RUN_FILE)
        for f in self.folder.glob("round_*.pth"):
            if not f.name.startswith(tag):
                f.unlink()

    def restore(self, trainer) -> dict:
        """Load the committed round into the trainer; return the deltas."""
        trainer.load_checkpoint(str(self.folder / f"round_{self.rounds_done:04d}.pth"))
        return self.deltas()

    def deltas(self) -> dict:
        """The committed round's perturbations (cropped grid, normalised units, on the CPU)."""
        return torch.load(self.folder / f"round_{self.rounds_done:04d}_state.pth", weights_only=True)["deltas"]
