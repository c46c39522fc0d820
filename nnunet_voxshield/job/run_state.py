"""Resumable state of one protection run, committed atomically after every round.

Each run has its own folder, `run_<fingerprint>` inside the surrogate trainer's nnU-Net output folder, keyed by the
fingerprint of the settings that define its perturbations. Protections of one source with other settings therefore
coexist, and the same settings always find (and resume, or reuse) their own run. The folder holds
`round_XXXX.pth` (nnU-Net's own surrogate checkpoint), `round_XXXX_state.pth` (the deltas) and `voxshield_run.json`
(settings and history); files of older rounds are removed after the commit. A run killed at any point resumes from
the last committed round. No random state is stored: the loop reseeds from (seed, round, ...) wherever it draws
(`method.bilevel.reseed`).

Runs from before the per-run folders kept these files directly in the trainer's folder; such a run is moved into
its own folder the first time the same settings ask for it, so it still resumes.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from nnunet_voxshield.job.atomic import atomic_write, save_json

RUN_FILE = "voxshield_run.json"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_folder(work_folder: Path, key: str) -> Path:
    return Path(work_folder) / f"run_{key}"


class RunState:
    """The committed progress of one protection run."""

    def __init__(self, folder: Path, settings: dict | None = None):
        """`folder` is the run's own folder; `settings` are those of the run about to start (None only reads)."""
        self.folder = Path(folder)
        self.settings = settings
        self.key = None if settings is None else fingerprint(settings)
        f = self.folder / RUN_FILE
        self.committed = json.loads(f.read_text()) if f.is_file() else None

    @classmethod
    def for_settings(cls, work_folder: Path, settings: dict) -> "RunState":
        """The run of these settings under `work_folder`, adopting a run of the old flat layout if it matches."""
        key = fingerprint(settings)
        folder = run_folder(work_folder, key)
        legacy = Path(work_folder) / RUN_FILE
        if not (folder / RUN_FILE).is_file() and legacy.is_file() and json.loads(legacy.read_text())["fingerprint"] == key:
            folder.mkdir(parents=True, exist_ok=True)
            for f in Path(work_folder).glob("round_*.pth"):
                os.replace(f, folder / f.name)
            os.replace(legacy, folder / RUN_FILE)  # last: until now the old layout is still complete
        return cls(folder, settings)

    @classmethod
    def find(cls, work_folder: str | Path, key: str) -> "RunState | None":
        """The committed run with fingerprint `key` (its own folder, or the old flat layout); None if gone."""
        for folder in (Path(work_folder), run_folder(work_folder, key)):
            state = cls(folder)
            if state.committed and state.committed["fingerprint"] == key:
                return state
        return None

    def discard(self) -> None:
        """Forget this run (--overwrite): the next round starts from scratch."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.committed = None

    @property
    def rounds_done(self) -> int:
        return self.committed["rounds_done"] if self.committed else 0

    @property
    def finished(self) -> bool:
        return bool(self.committed and self.committed["finished"])

    @property
    def history(self) -> list:
        return list(self.committed["history"]) if self.committed else []

    def save(self, trainer, rounds_done: int, deltas: dict, history: list, finished: bool,
             extra: dict | None = None) -> None:
        """Commit a round; `extra` holds what else the method needs to resume (the generator's weights)."""
        tag = f"round_{rounds_done:04d}"
        trainer.current_epoch = rounds_done - 1  # nnU-Net stores current_epoch + 1
        atomic_write(self.folder / f"{tag}.pth", trainer.save_checkpoint, suffix=".pth")
        state = {**(extra or {}), "deltas": {str(k): v.cpu() for k, v in deltas.items()}}
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
        return self.method_state()["deltas"]

    def method_state(self) -> dict:
        """The committed round's deltas and the `extra` saved with them."""
        return torch.load(self.folder / f"round_{self.rounds_done:04d}_state.pth", weights_only=True)
