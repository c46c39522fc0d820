"""Shortcut or slowdown: every few epochs, a victim's Dice on its own (protected) training cases and on clean held-out
cases, beside its training loss.

A shortcut shows as a wide gap: high Dice on the protected training cases, low on clean scans. Equal values mean the
perturbation only slowed learning, which a longer schedule undoes. `nnUNetv2_voxshield_evaluate` turns this on for its
victims by pointing `VOXSHIELD_DIAGNOSTICS` at a JSON file (`{"every": epochs, "train_cases": n, "heldout":
[{"images": [...], "label": ...}, ...]}`, `every` 0 meaning a tenth of the schedule); the curve goes to
`voxshield_curves.json` in the run's fold folder.

Dice here is measured on nnU-Net's preprocessed grid (sliding window without mirroring), which is what the network
sees; the evaluation's headline Dice is nnU-Net's own, on the original files.
"""
import json
import os
from pathlib import Path

from nnunet_voxshield.job.atomic import save_json
from nnunet_voxshield.nnunet.scoring import case_predictor, cases_dice

ENV = "VOXSHIELD_DIAGNOSTICS"
CURVES = "voxshield_curves.json"


def read_curve(fold_folder: Path) -> list[dict]:
    f = Path(fold_folder) / CURVES
    return json.loads(f.read_text())["curve"] if f.is_file() else []


class Diagnostics:
    """What one victim measures on itself; built from the VOXSHIELD_DIAGNOSTICS file at the start of training."""

    def __init__(self, trainer, spec: dict):
        self.every = int(spec.get("every", 0)) or max(1, trainer.num_epochs // 10)
        self.labels = trainer.label_manager.foreground_labels
        preprocessor = trainer.configuration_manager.preprocessor_class(verbose=False)
        self.heldout = [preprocessor.run_case(c["images"], c["label"], trainer.plans_manager,
                                              trainer.configuration_manager, trainer.dataset_json)[:2]
                        for c in spec["heldout"]]  # clean scans, preprocessed with the victim's own plans
        train_set = trainer.get_tr_and_val_datasets()[0]
        first = sorted(train_set.identifiers)[:int(spec.get("train_cases", 4))]
        self.train = [train_set.load_case(i)[:2] for i in first]
        self.predictor = case_predictor(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                        trainer.dataset_json, type(trainer).__name__, trainer.device)
        self.file = Path(trainer.output_folder) / CURVES
        # `nnUNetv2_train --c` restarts from checkpoint_latest: keep the points recorded up to it, drop later ones
        self.curve = [p for p in read_curve(trainer.output_folder) if p["epoch"] <= trainer.current_epoch]

    @classmethod
    def from_env(cls, trainer) -> "Diagnostics | None":
        spec = os.environ.get(ENV)
        return cls(trainer, json.loads(Path(spec).read_text())) if spec else None

    def due(self, epochs_done: int, num_epochs: int) -> bool:
        return epochs_done % self.every == 0 or epochs_done == num_epochs

    def record(self, trainer, epochs_done: int) -> None:
        trainer.set_deep_supervision_enabled(False)
        trainer.network.eval()
        train, heldout = cases_dice(self.predictor, self.train, self.labels), \
            cases_dice(self.predictor, self.heldout, self.labels)
        trainer.network.train()
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        self.curve.append({"epoch": epochs_done, "iterations": epochs_done * trainer.num_iterations_per_epoch,
                           "train_loss": float(trainer.logger.get_value("train_losses", step=-1)),
                           "dice_own_training_cases": train, "dice_clean_heldout": heldout})
        save_json({"trainer": type(trainer).__name__, "curve": self.curve}, self.file)


class DiagnosedTraining:
    """Trainer mixin: record the diagnostics every `every` epochs when VOXSHIELD_DIAGNOSTICS is set."""

    def on_train_start(self):
        super().on_train_start()
        self.diagnostics = Diagnostics.from_env(self)

    def on_epoch_end(self):
        super().on_epoch_end()  # nnU-Net counts the finished epoch here
        if self.diagnostics is not None and self.diagnostics.due(self.current_epoch, self.num_epochs):
            self.diagnostics.record(self, self.current_epoch)
