"""nnUNetv2_voxshield_evaluate: real nnU-Net victims end to end on a tiny dataset, resuming, and its one-line errors."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_voxshield.evaluation import evaluate as ev
from nnunet_voxshield.cli.evaluate import main
from nnunet_voxshield.errors import VoxShieldError
from synthetic import make_raw_dataset

REPO = Path(__file__).resolve().parent.parent
VICTIMS = ["nnUNetTrainerVS_Tiny", "nnUNetTrainerVS_TinySliceShuffle"]


def noisy_copy(source: Path, dataset_id: int, amplitude: float = 2.0) -> Path:
    """Stand-in for a protected dataset: the same cases with uniform noise on the training images."""
    target = source.parent / f"Dataset{dataset_id:03d}_TinyNoisy"
    shutil.copytree(source, target)
    rng = np.random.default_rng(1)
    for f in (target / "imagesTr").iterdir():
        image = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(image)
        noisy = sitk.GetImageFromArray((arr + rng.uniform(-amplitude, amplitude, arr.shape)).astype(arr.dtype))
        noisy.CopyInformation(image)
        sitk.WriteImage(noisy, str(f))
    return target


def nnunet_env(mp: pytest.MonkeyPatch, root: Path) -> dict:
    dirs = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        dirs[name] = root / name
        dirs[name].mkdir(parents=True, exist_ok=True)
        mp.setenv(name, str(dirs[name]))
    # nnUNetv2_train imports our trainers, which import nnunet_voxshield: make the checkout importable there too
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return dirs


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One real evaluation: 2 victims x (clean, protected) x 1 seed, 2 epochs x 5 iterations each."""
    with pytest.MonkeyPatch.context() as mp:
        dirs = nnunet_env(mp, tmp_path_factory.mktemp("eval"))
        source = make_raw_dataset(dirs["nnUNet_raw"], 701, n_train=5, n_test=2)
        noisy_copy(source, 702)
        main(["-d", "701", "-pd", "702", "-tr", *VICTIMS, "--seeds", "1", "-device", "cpu"])
        out = dirs["nnUNet_results"] / "Dataset702_TinyNoisy" / "voxshield_evaluation"
        yield {"dirs": dirs, "out": out, "mp": mp, "report": json.loads((out / "evaluation.json").read_text())}


@pytest.mark.slow
def test_writes_json_markdown_and_png(evaluated):
    report, out = evaluated["report"], evaluated["out"]
    assert [v["victim"] for v in report["victims"]] == [f"{t} (3d_fullres)" for t in VICTIMS]
    assert report["heldout"]["cases"] == ["tiny_005", "tiny_006"]
    for victim in report["victims"]:
        assert set(victim["labels"]) == {"outer", "inner", "mean"} and victim["schedule"] == "2 x 5"
        for stats in victim["labels"].values():
            for kind in ev.KINDS:
                assert len(stats[kind]["values"]) == 1 and stats[kind]["std"] is None
                assert stats[kind]["mean"] is None or 0 <= stats[kind]["mean"] <= 1
    table = (out / "evaluation.md").read_text()
    assert "| nnUNetTrainerVS_TinySliceShuffle (3d_fullres) | 2 x 5 | outer |" in table
    assert "slices of every training sample randomly permuted along z" in table
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "evaluation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| nnUNetTrainerVS_TinySliceShuffle (3d_fullres) | protected | 0 |" in table  # the shortcut table


@pytest.mark.slow
def test_every_victim_records_the_shortcut_diagnostics(evaluated):
    """Each epoch of the 2-epoch victims: training loss, Dice on its own training cases and on clean held-out ones."""
    for r in evaluated["report"]["runs"]:
        assert [p["epoch"] for p in r["curve"]] == [1, 2] and [p["iterations"] for p in r["curve"]] == [5, 10]
        for point in r["curve"]:
            assert np.isfinite(point["train_loss"])
            assert 0 <= point["dice_own_training_cases"] <= 1 and 0 <= point["dice_clean_heldout"] <= 1


@pytest.mark.slow
def test_a_resumed_victim_keeps_the_curve_points_recorded_before_its_checkpoint(evaluated):
    """A run killed after epoch 1 and resumed with `nnUNetv2_train --c` keeps epoch 1's point and records epoch 2 anew.
    Played on a copy of a finished clean run under the seed-1 plans, so the fixture's runs stay as they are."""
    results = evaluated["dirs"]["nnUNet_results"] / "Dataset701_Tiny"
    finished = results / f"{VICTIMS[0]}__nnUNetPlans__3d_fullres" / "fold_0"
    plans = ev.seed_plans("Dataset701_Tiny", "nnUNetPlans", 1)
    fold = results / f"{VICTIMS[0]}__{plans}__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    checkpoint = torch.load(finished / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["current_epoch"] = 1  # as nnU-Net saves it after one finished epoch
    torch.save(checkpoint, fold / "checkpoint_latest.pth")
    before = json.loads((finished / "voxshield_curves.json").read_text())
    before["curve"][1]["train_loss"] = 99.0  # a point of the lost epoch 2: must be replaced, not kept
    (fold / "voxshield_curves.json").write_text(json.dumps(before))
    ev.run_nnunet(["nnUNetv2_train", "701", "3d_fullres", "0", "-tr", VICTIMS[0], "-p", plans,
                   "-device", "cpu", "--c"], extra_env={ev.DIAGNOSTICS_ENV: str(evaluated["out"] / "diagnostics.json")})
    after = ev.read_curve(fold)
    assert [p["epoch"] for p in after] == [1, 2]
    assert after[0] == before["curve"][0] and after[1]["train_loss"] != 99.0


@pytest.mark.slow
def test_every_run_is_a_real_nnunet_training_of_the_named_trainer(evaluated):
    results = evaluated["dirs"]["nnUNet_results"]
    runs = evaluated["report"]["runs"]
    assert sorted((r["dataset"], r["trainer"]) for r in runs) == sorted(
        (d, t) for d in ("Dataset701_Tiny", "Dataset702_TinyNoisy") for t in VICTIMS)
    for r in runs:
        fold = results / r["dataset"] / f"{r['trainer']}__nnUNetPlans__3d_fullres" / "fold_0"
        assert (fold / "checkpoint_final.pth").is_file()
        debug = json.loads((fold / "debug.json").read_text())
        assert (debug["num_epochs"], debug["num_iterations_per_epoch"]) == ("2", "5")
        log = "".join(f.read_text() for f in fold.glob("training_log_*.txt"))
        assert ("ShuffleSlices" in log) == r["trainer"].endswith("Shuffle")
        assert r["train_command"].startswith(f"nnUNetv2_train {r['dataset'][7:10]} 3d_fullres 0 -tr {r['trainer']}")
        predictions = evaluated["out"] / "predictions" / r["key"]
        assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["tiny_005.nii.gz", "tiny_006.nii.gz"]
        assert set(r["per_case"]) == {"tiny_005.nii.gz", "tiny_006.nii.gz"}


@pytest.mark.slow
def test_rerun_resumes_from_finished_runs(evaluated, monkeypatch):
    calls = []
    real_run = ev.run_nnunet
    monkeypatch.setattr(ev, "run_nnunet", lambda args, **kw: calls.append(args[0]) or real_run(args, **kw))
    interrupted = next(iter((evaluated["out"] / "runs").glob("protected__*SliceShuffle*.json")))
    lost = json.loads(interrupted.read_text())
    interrupted.unlink()  # as if killed after training, before scoring
    report = ev.evaluate(701, 702, trainers=VICTIMS, seeds=1, device="cpu", log=lambda msg: None)
    assert calls == ["nnUNetv2_predict"]  # nothing retrained, only the lost run predicted again
    again = next(r for r in report["runs"] if r["key"] == lost["key"])
    assert again["dice"] == pytest.approx(lost["dice"], nan_ok=True)
    assert [v["labels"] for v in report["victims"]] == [v["labels"] for v in evaluated["report"]["victims"]]


@pytest.mark.slow
def test_holdout_val_scores_on_the_folds_validation_case(evaluated, tmp_path):
    report = ev.evaluate(701, 702, trainers=VICTIMS[:1], seeds=1, device="cpu", output=tmp_path,
                         holdout_val=True, log=lambda msg: None)
    splits = json.loads((evaluated["dirs"]["nnUNet_preprocessed"] / "Dataset701_Tiny" / "splits_final.json")
                        .read_text())
    assert report["heldout"]["cases"] == sorted(splits[0]["val"])
    assert all(set(r["per_case"]) == {f"{c}.nii.gz" for c in splits[0]["val"]} for r in report["runs"])


# ---------------------------------------------------------------- no training below


@pytest.fixture
def two_datasets(nnunet_dirs, monkeypatch):
    source = make_raw_dataset(nnunet_dirs["nnUNet_raw"], 711, n_train=5, n_test=0, shape=(8, 8, 8))
    noisy_copy(source, 712)
    return nnunet_dirs


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "-device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_missing_test_set_names_the_holdout_flag(two_datasets, capsys):
    assert "--holdout-val" in error_of(capsys, "-d", "711", "-pd", "712", "-tr", "nnUNetTrainerVS_Tiny")


def test_bad_inputs_fail_in_one_line(two_datasets, capsys):
    assert "same dataset" in error_of(capsys, "-d", "711", "-pd", "711")
    assert "check -tr" in error_of(capsys, "-d", "711", "-pd", "712", "-tr", "NoSuchTrainer")
    assert "-f all" in error_of(capsys, "-d", "711", "-pd", "712", "-f", "all", "--holdout-val")
    (two_datasets["nnUNet_raw"] / "Dataset712_TinyNoisy" / "labelsTr" / "tiny_000.nii.gz").rename(
        two_datasets["nnUNet_raw"] / "Dataset712_TinyNoisy" / "labelsTr" / "other_000.nii.gz")
    for f in (two_datasets["nnUNet_raw"] / "Dataset712_TinyNoisy" / "imagesTr").glob("tiny_000_*"):
        f.rename(f.with_name(f.name.replace("tiny_000", "other_000")))
    assert "different training cases" in error_of(capsys, "-d", "711", "-pd", "712")


def test_fold_validation_set_uses_nnunets_split_in_both_datasets(two_datasets):
    dataset_json = json.loads((two_datasets["nnUNet_raw"] / "Dataset711_Tiny" / "dataset.json").read_text())
    heldout = ev.fold_validation_set(("Dataset711_Tiny", "Dataset712_TinyNoisy"), "1", dataset_json)
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    expected = generate_crossval_split([f"tiny_{i:03d}" for i in range(5)], seed=12345, n_splits=5)[1]["val"]
    assert sorted(heldout.labels) == sorted(expected)
    assert all(Path(f).parent.name == "imagesTr" for files in heldout.images.values() for f in files)
    other = two_datasets["nnUNet_preprocessed"] / "Dataset712_TinyNoisy" / "splits_final.json"
    splits = json.loads(other.read_text())
    splits[1]["val"], splits[1]["train"][0] = [splits[1]["train"][0]], splits[1]["val"][0]
    other.write_text(json.dumps(splits))
    with pytest.raises(VoxShieldError, match="differ"):
        ev.fold_validation_set(("Dataset711_Tiny", "Dataset712_TinyNoisy"), "1", dataset_json)


def test_seed_plans_are_copies_with_their_own_name(nnunet_dirs):
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset713_X"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": {"a": 1}}))
    assert ev.seed_plans("Dataset713_X", "nnUNetPlans", 0) == "nnUNetPlans"
    assert ev.seed_plans("Dataset713_X", "nnUNetPlans", 2) == "nnUNetPlans_seed2"
    assert json.loads((folder / "nnUNetPlans_seed2.json").read_text()) == {
        "plans_name": "nnUNetPlans_seed2", "configurations": {"a": 1}}


def test_victim_spec_names_its_configuration():
    assert ev.Victim.parse("nnUNetTrainerVS_Short:2d", "3d_fullres") == ev.Victim("nnUNetTrainerVS_Short", "2d")
    assert ev.Victim.parse("nnUNetTrainer", "3d_fullres").name == "nnUNetTrainer (3d_fullres)"


def test_summary_statistics_over_seeds_and_ratio():
    victim = ev.Victim("T", "3d_fullres")

    def record(kind, seed, outer):
        return {"trainer": "T", "configuration": "3d_fullres", "kind": kind, "seed": seed, "schedule": "2 x 5",
                "dice": {"outer": outer}, "mean_dice": outer}

    records = [record("clean", 0, 0.8), record("clean", 1, 0.9), record("protected", 0, 0.1),
               record("protected", 1, None)]
    [summary] = ev.summarise_victims(records, [victim], {"T": "doc"}, ["outer"])
    outer = summary["labels"]["outer"]
    assert outer["clean"]["mean"] == pytest.approx(0.85) and outer["clean"]["std"] == pytest.approx(np.std([.8, .9],
                                                                                                           ddof=1))
    assert outer["protected"]["mean"] == pytest.approx(0.1) and outer["protected"]["std"] is None
    assert outer["ratio"] == pytest.approx(0.1 / 0.85)
    report = {"source": "S", "protected": "P", "fold": "0", "seeds": 2, "victims": [summary], "runs": [],
              "heldout": {"origin": "imagesTs/labelsTs of S", "cases": ["a"]}}
    assert "| T (3d_fullres) | 2 x 5 | outer | 0.850 ± 0.071 | 0.100 | 0.12 |" in ev.markdown(report)
