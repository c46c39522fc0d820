"""Run state: one folder per settings fingerprint, committed atomically; runs of the old flat layout still resume."""
import json

import torch

from nnunet_voxshield.job.run_state import RUN_FILE, RunState, fingerprint, run_folder


class Trainer:
    current_epoch = 0

    def save_checkpoint(self, path):
        torch.save({"epoch": self.current_epoch}, path)


def commit(state, rounds, value, finished=False):
    state.save(Trainer(), rounds, {"case": torch.full((1, 2, 2, 2), value)}, [{"round": rounds}], finished)


def test_runs_of_other_settings_coexist(tmp_path):
    a, b = RunState.for_settings(tmp_path, {"seed": 0}), RunState.for_settings(tmp_path, {"seed": 1})
    commit(a, 1, 1.0)
    commit(b, 2, 2.0, finished=True)
    assert a.folder != b.folder and a.folder == run_folder(tmp_path, fingerprint({"seed": 0}))
    again = RunState.for_settings(tmp_path, {"seed": 0})
    assert again.rounds_done == 1 and not again.finished and float(again.deltas()["case"].max()) == 1.0
    assert RunState.for_settings(tmp_path, {"seed": 1}).finished
    assert sorted(p.name for p in a.folder.iterdir()) == ["round_0001.pth", "round_0001_state.pth", RUN_FILE]


def test_a_run_of_the_flat_layout_is_adopted_by_the_same_settings_only(tmp_path):
    legacy = RunState(tmp_path, {"seed": 3})
    commit(legacy, 2, 3.0)
    assert RunState.for_settings(tmp_path, {"seed": 4}).committed is None
    assert (tmp_path / RUN_FILE).is_file(), "other settings must leave the old run alone"
    adopted = RunState.for_settings(tmp_path, {"seed": 3})
    assert adopted.rounds_done == 2 and float(adopted.deltas()["case"].max()) == 3.0
    assert not (tmp_path / RUN_FILE).exists() and not list(tmp_path.glob("round_*.pth"))
    assert json.loads((adopted.folder / RUN_FILE).read_text())["fingerprint"] == fingerprint({"seed": 3})


def test_find_locates_a_run_by_fingerprint_in_either_layout(tmp_path):
    commit(RunState(tmp_path, {"seed": 5}), 1, 5.0)
    commit(RunState.for_settings(tmp_path, {"seed": 6}), 1, 6.0)
    assert float(RunState.find(tmp_path, fingerprint({"seed": 5})).deltas()["case"].max()) == 5.0
    assert float(RunState.find(tmp_path, fingerprint({"seed": 6})).deltas()["case"].max()) == 6.0
    assert RunState.find(tmp_path, fingerprint({"seed": 7})) is None


def test_discard_forgets_the_run(tmp_path):
    state = RunState.for_settings(tmp_path, {"seed": 0})
    commit(state, 1, 1.0)
    state.discard()
    assert RunState.for_settings(tmp_path, {"seed": 0}).committed is None


def test_options_added_later_keep_the_fingerprint_of_runs_made_before_them():
    """A default --init, --reinit-every and --free-band leave the key as it was, so earlier runs still resume and are
    reused."""
    from dataclasses import replace

    from nnunet_voxshield.config import ProtectSettings, Schedule
    default = ProtectSettings("Dataset501_X")
    assert fingerprint(default.optimisation_key()) == "3be2e96cf91863ca"  # the key before the later options
    assert fingerprint(replace(default, init="codes").optimisation_key()) != fingerprint(default.optimisation_key())
    for later in (Schedule(reinit_every=5), Schedule(free_band=1)):
        assert (fingerprint(replace(default, schedule=later).optimisation_key())
                != fingerprint(default.optimisation_key()))
