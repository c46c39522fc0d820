"""Plan, preprocess, protect, check, re-plan the protected set and train a stock victim on it; resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_voxshield.cli import check as check_cli
from nnunet_voxshield.cli import protect as protect_cli
from nnunet_voxshield.nnunet.env import plan_and_preprocess
from synthetic import make_raw_dataset, neighbour_products, tree_hash

pytestmark = pytest.mark.slow  # real nnU-Net planning and training

SRC, OUT = 991, 691
FAST = ["-device", "cpu", "--rounds", "2", "--surrogate-iters", "2", "--probe-every", "0"]


def read_int(raw: Path, path: str) -> np.ndarray:
    """A written raw file as int32, so that differences of int16 images do not wrap."""
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(raw / path))).astype(np.int32)


@pytest.fixture(scope="module")
def planned(nnunet_module_dirs):
    """A tiny anisotropic int16 CT-like dataset, planned and preprocessed by stock nnU-Net."""
    make_raw_dataset(nnunet_module_dirs["nnUNet_raw"], SRC, n_train=4, n_test=2, shape=(16, 32, 32),
                     spacing_xyz=(1, 1, 2.5), channels=("CT",), dtype=np.int16, body=True)
    plan_and_preprocess(SRC)
    return nnunet_module_dirs


def test_protect_check_and_stock_victim(planned):
    src = planned["nnUNet_raw"] / f"Dataset{SRC}_Tiny"
    before = tree_hash(src)
    assert protect_cli.main(["-d", str(SRC), "-o", str(OUT), *FAST, "--probe-every", "1", "--probe-iters", "3"]) == 0
    assert tree_hash(src) == before, "the source dataset must never be modified"
    out = planned["nnUNet_raw"] / f"Dataset{OUT}_TinyVoxShield"
    report = json.loads((out / "voxshield.json").read_text())
    assert len(report["history"]) == 2
    for record in report["history"]:  # a fresh network trained on x + delta, scored on a clean held-out case
        assert record["probe_iterations"] == 3 and record["probe_heldout_cases"] == ["tiny_003"]
        assert 0 <= record["probe_dice_clean_heldout"] <= 1 and 0 <= record["probe_dice_clean_trained"] <= 1
    assert report["probe"] == report["history"][-1]
    assert report["summary"]["max_budget_fraction"] <= 1
    assert report["summary"]["min_survival_corr"] > 0.9
    assert (out / "voxshield_preview.png").stat().st_size > 10_000
    assert check_cli.main(["-d", str(SRC), "-pd", str(OUT)]) == 0

    # an output that exists is refused without --overwrite, with a one-line error
    with pytest.raises(SystemExit) as e:
        protect_cli.main(["-d", str(SRC), "-o", str(OUT), *FAST])
    assert e.value.code == 2
    # ... but --continue on a complete output of the same settings says so and succeeds
    assert protect_cli.main(["-d", str(SRC), "-o", str(OUT), *FAST, "--continue"]) == 0

    # stock nnU-Net takes the protected dataset as it is: plan, preprocess, one training step of nnUNetTrainer
    plan_and_preprocess(OUT)
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(str(OUT), "3d_fullres", "all", "nnUNetTrainer", device=torch.device("cpu"))
    trainer.on_train_start()
    loss = trainer.train_step(next(trainer.dataloader_train))["loss"]
    assert np.isfinite(loss)
    trainer.on_train_end()


def test_check_reports_a_budget_violation(planned):
    out = planned["nnUNet_raw"] / f"Dataset{OUT}_TinyVoxShield"
    if not out.exists():
        pytest.skip("needs the protected dataset of the previous test")
    import SimpleITK as sitk
    f = sorted((out / "imagesTr").iterdir())[0]
    img = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(img)
    arr[arr != 0] += 1000
    tampered = sitk.GetImageFromArray(arr)
    tampered.CopyInformation(img)
    sitk.WriteImage(tampered, str(f))
    assert check_cli.main(["-d", str(SRC), "-pd", str(OUT)]) == 1


def test_resume_after_kill(planned):
    """SIGKILL a run after its first committed round; the same command resumes it, ends where an uninterrupted run
    ends, and the result passes check."""
    results = planned["nnUNet_results"] / f"Dataset{SRC}_Tiny"
    args = [sys.executable, "-m", "nnunet_voxshield.cli.protect", "-d", str(SRC), "-o", "692", "-device", "cpu",
            "--rounds", "3", "--surrogate-iters", "2", "--seed", "1", "--probe-every", "0", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    run_file = None
    while time.time() < deadline and proc.poll() is None:
        for f in results.glob("nnUNetTrainerVoxShieldSurrogate__*/fold_all/run_*/voxshield_run.json"):
            state = json.loads(f.read_text())
            if state["rounds_done"] >= 1 and state["settings"]["seed"] == 1:
                run_file = f
        if run_file is not None:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (planned["nnUNet_raw"] / "Dataset692_TinyVoxShield").exists()
    resumed = subprocess.run(args[:-1], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after round" in resumed.stdout
    report = json.loads((planned["nnUNet_raw"] / "Dataset692_TinyVoxShield" / "voxshield.json").read_text())
    assert [h["round"] for h in report["history"]] == [1, 2, 3]
    assert check_cli.main(["-d", str(SRC), "-pd", "692"]) == 0

    from nnunet_voxshield.job.run_state import RunState
    resumed_deltas = RunState(run_file.parent).deltas()
    uninterrupted = _optimised(planned, ["-o", "695", "--rounds", "3", "--surrogate-iters", "2", "--seed", "1"])
    for k in uninterrupted:
        assert float((resumed_deltas[k] - uninterrupted[k]).abs().max()) < 1e-5, k


def _optimised(planned, args) -> dict:
    """Protect with `args` from scratch (--overwrite); return the run's final deltas from its committed state."""
    from nnunet_voxshield.job.run_state import RunState
    assert protect_cli.main(["-d", str(SRC), "-device", "cpu", "--rounds", "2", "--probe-every", "0", "--overwrite",
                             *args]) == 0
    out = next(planned["nnUNet_raw"].glob(f"Dataset{args[args.index('-o') + 1]}_*"))
    return RunState(json.loads((out / "voxshield.json").read_text())["work_folder"]).deltas()


def test_runs_of_other_settings_coexist_and_same_settings_reuse(planned, capsys):
    """Each run keeps its own state: a second protection with other settings leaves the first one's intact, and the
    same settings into a new output reuse the finished run (said in the log) instead of optimising again."""
    a = _optimised(planned, ["-o", "697", "--seed", "7", "--surrogate-iters", "1"])
    b = _optimised(planned, ["-o", "698", "--seed", "8", "--surrogate-iters", "1"])
    folders = {json.loads((next(planned["nnUNet_raw"].glob(f"Dataset{i}_*")) / "voxshield.json").read_text())
               ["work_folder"] for i in (697, 698)}
    assert len(folders) == 2 and all((Path(f) / "voxshield_run.json").is_file() for f in folders)
    assert any(float((a[k] - b[k]).abs().max()) > 0 for k in a)
    capsys.readouterr()
    assert protect_cli.main(["-d", str(SRC), "-o", "699", "-device", "cpu", "--rounds", "2", "--probe-every", "0",
                             "--seed", "7",
                             "--surrogate-iters", "1"]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert check_cli.main(["-d", str(SRC), "-pd", "699"]) == 0


def test_targeted_poisoning_attacks_a_fixed_clean_network(planned, capsys):
    """--method targeted needs a clean network (--warm-start), never trains it, and writes a checked dataset."""
    with pytest.raises(SystemExit):
        protect_cli.main(["-d", str(SRC), "-o", "688", *FAST, "--method", "targeted"])
    assert "--warm-start" in capsys.readouterr().err
    clean = Path(json.loads((planned["nnUNet_raw"] / f"Dataset{OUT}_TinyVoxShield" / "voxshield.json").read_text())
                 ["work_folder"]) / "checkpoint_final.pth"
    assert protect_cli.main(["-d", str(SRC), "-o", "688", *FAST, "--method", "targeted", "--warm-start",
                             str(clean)]) == 0
    history = json.loads((planned["nnUNet_raw"] / "Dataset688_TinyVoxShield" / "voxshield.json").read_text())["history"]
    assert len(history) == 2 and all(np.isnan(h["surrogate_train_loss"]) for h in history)
    assert check_cli.main(["-d", str(SRC), "-pd", "688"]) == 0


def test_noise_started_from_the_codes_against_a_reinitialised_surrogate(planned):
    """--init codes starts the bilevel loop from the gratings (two steps of a quarter budget cannot flip their sign);
    --reinit-every 1 starts the surrogate over before round 2 with fresh weights drawn from the seed."""
    assert protect_cli.main(["-d", str(SRC), "-o", "686", *FAST, "--method", "codes"]) == 0
    assert protect_cli.main(["-d", str(SRC), "-o", "687", *FAST, "--init", "codes", "--reinit-every", "1"]) == 0
    assert check_cli.main(["-d", str(SRC), "-pd", "687"]) == 0
    raw = planned["nnUNet_raw"]
    read = lambda folder: read_int(raw, f"{folder}/imagesTr/tiny_000_0000.nii.gz")
    source = read(f"Dataset{SRC}_Tiny")
    codes, started = (read(f"Dataset{i}_TinyVoxShield") - source for i in (686, 687))
    on = codes != 0
    assert on.sum() > 100 and (np.sign(started[on]) == np.sign(codes[on])).mean() > 0.95
    assert not np.array_equal(started, codes)  # ... and the noise steps moved it


def test_free_band_refines_the_code_only_next_to_label_boundaries(planned):
    """--free-band 1 keeps the written code exactly as drawn away from label boundaries and lets the noise steps
    change it on the voxels that touch another label (the band is found on the cropped grid; cropping and nnU-Net's
    transposition do not change which voxels touch another label)."""
    from nnunet_voxshield.method.budget import boundary_band
    assert protect_cli.main(["-d", str(SRC), "-o", "682", *FAST, "--method", "codes"]) == 0
    assert protect_cli.main(["-d", str(SRC), "-o", "683", *FAST, "--init", "codes", "--free-band", "1"]) == 0
    raw = planned["nnUNet_raw"]
    read = lambda path: read_int(raw, path)
    source = read(f"Dataset{SRC}_Tiny/imagesTr/tiny_000_0000.nii.gz")
    codes, refined = (read(f"Dataset{i}_TinyVoxShield/imagesTr/tiny_000_0000.nii.gz") - source for i in (682, 683))
    band = boundary_band(read(f"Dataset{SRC}_Tiny/labelsTr/tiny_000.nii.gz"), 1)
    assert np.array_equal(refined[~band], codes[~band])
    assert (refined[band] != codes[band]).any() and (codes[~band] != 0).sum() > 100


def test_parity_codes_are_written_to_the_voxel(planned):
    """--method parity: the written files carry, on every labelled voxel the clip window leaves room for, a code that
    alternates along a fixed set of axes per label (distinct between the labels) and nothing elsewhere, and the
    protected set passes check (period-2 codes survive the int16 export and nnU-Net's preprocessing)."""
    assert protect_cli.main(["-d", str(SRC), "-o", "680", *FAST, "--method", "parity", "--eps", "12/255"]) == 0
    assert check_cli.main(["-d", str(SRC), "-pd", "680"]) == 0
    raw = planned["nnUNet_raw"]
    read = lambda path: read_int(raw, path)
    image = "imagesTr/tiny_000_0000.nii.gz"
    delta = read(f"Dataset680_TinyVoxShield/{image}") - read(f"Dataset{SRC}_Tiny/{image}")
    labels = read(f"Dataset{SRC}_Tiny/labelsTr/tiny_000.nii.gz")
    assert not delta[labels == 0].any()
    signatures = []
    for label in (1, 2):
        on = (labels == label) & (delta != 0)
        assert on.sum() > 0.9 * (labels == label).sum()
        signature = [neighbour_products(np.sign(delta), on, axis) for axis in range(3)]
        assert all(len(products) == 1 for products in signature)  # each axis alternates everywhere inside, or nowhere
        signatures.append(signature)
    assert signatures[0] != signatures[1]


def test_levels_move_each_label_toward_one_intensity_in_the_written_files(planned):
    """--method levels: in the written files each label's voxels moved toward one intensity of that label's own
    (every voxel moved up is darker than every voxel moved down), so the label is flatter than in the source, nothing
    moved outside the labels, and the protected set passes check."""
    assert protect_cli.main(["-d", str(SRC), "-o", "681", *FAST, "--method", "levels", "--eps", "12/255"]) == 0
    assert check_cli.main(["-d", str(SRC), "-pd", "681"]) == 0
    raw = planned["nnUNet_raw"]
    read = lambda path: read_int(raw, path)
    for case in ("tiny_000", "tiny_001"):
        source = read(f"Dataset{SRC}_Tiny/imagesTr/{case}_0000.nii.gz")
        delta = read(f"Dataset681_TinyVoxShield/imagesTr/{case}_0000.nii.gz") - source
        labels = read(f"Dataset{SRC}_Tiny/labelsTr/{case}.nii.gz")
        assert not delta[labels == 0].any()
        for label in (1, 2):
            inside = labels == label
            assert source[inside & (delta > 0)].max() < source[inside & (delta < 0)].min()
            assert (source + delta)[inside].std() < 0.8 * source[inside].std()


def test_generator_writes_one_code_resumably_and_refuses_multi_process_runs(planned, capsys):
    """--method generator: a checked dataset within budget, the generator's weights committed with each round (what
    a resumed run continues from), and one line refusing -num_gpus 2."""
    from nnunet_voxshield.job.run_state import RunState
    assert protect_cli.main(["-d", str(SRC), "-o", "685", *FAST, "--method", "generator"]) == 0
    assert check_cli.main(["-d", str(SRC), "-pd", "685"]) == 0
    report = json.loads((planned["nnUNet_raw"] / "Dataset685_TinyVoxShield" / "voxshield.json").read_text())
    state = RunState(report["work_folder"]).method_state()
    assert {"generator", "generator_optimiser", "deltas"} <= set(state) and len(report["history"]) == 2
    assert all(float(d.abs().max()) > 0 for d in state["deltas"].values())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        protect_cli.main(["-d", str(SRC), "-o", "684", *FAST, "--method", "generator", "-num_gpus", "2"])
    assert e.value.code == 2 and "use -num_gpus 1" in capsys.readouterr().err


def test_surrogate_starts_over_and_loads_whole_checkpoints(planned, tmp_path):
    """reinitialise draws fresh weights from its seed with a new optimiser; load_weights (--warm-start) restores every
    weight, the segmentation heads included, which nnU-Net's load_pretrained_weights leaves out."""
    from nnunet_voxshield.errors import VoxShieldError
    from nnunet_voxshield.nnunet.surrogate import nnUNetTrainerVoxShieldSurrogate
    pre = planned["nnUNet_preprocessed"] / f"Dataset{SRC}_Tiny"
    plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}
    trainer = nnUNetTrainerVoxShieldSurrogate(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                                              torch.device("cpu"))
    trainer.initialize()
    weights = lambda: [p.detach().clone() for p in trainer.network.parameters()]
    trained, optimiser = weights(), trainer.optimizer
    trainer.reinitialise(7)
    fresh = weights()
    trainer.reinitialise(7)
    assert all(torch.equal(a, b) for a, b in zip(fresh, weights()))
    assert not all(torch.equal(a, b) for a, b in zip(trained, fresh)) and trainer.optimizer is not optimiser

    trainer.save_checkpoint(str(tmp_path / "fresh.pth"))
    trainer.reinitialise(8)
    trainer.load_weights(str(tmp_path / "fresh.pth"))
    assert all(torch.equal(a, b) for a, b in zip(fresh, weights()))
    assert any("seg_layers" in name for name, _ in trainer.network.named_parameters())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VoxShieldError, match="is not a checkpoint of this dataset's planned 3d_fullres network"):
        trainer.load_weights(str(tmp_path / "junk.pth"))


def test_augmentation_workers_die_with_a_killed_protect(planned):
    """kill -9 of protect (what the out-of-memory killer does) must not leave nnU-Net's augmentation workers behind."""
    args = [sys.executable, "-m", "nnunet_voxshield.cli.protect", "-d", str(SRC), "-o", "690", "-device", "cpu",
            "--rounds", "50", "--surrogate-iters", "2", "--seed", "5", "--probe-every", "0", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "nnUNet_n_proc_DA": "2"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(workers) < 2:
        time.sleep(0.5)
        workers = _children(proc.pid)
    assert len(workers) >= 2, "nnU-Net's augmentation workers never started"
    time.sleep(2)  # let every worker load a case
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.5)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"{len(alive)} worker(s) outlived their killed parent"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.is_file() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_two_gloo_processes_match_one_process(planned):
    """-num_gpus 2 on the CPU (gloo): with a fixed surrogate the sharded noise steps reproduce a single process."""
    one = _optimised(planned, ["-o", "692", "--surrogate-iters", "0"])
    two = _optimised(planned, ["-o", "693", "--surrogate-iters", "0", "-num_gpus", "2"])
    assert sorted(one) == sorted(two) and len(one) == 4
    for k in one:
        assert float((one[k] - two[k]).abs().max()) < 1e-5, k
        assert float(one[k].abs().max()) > 0


def test_two_gloo_processes_train_the_surrogate_with_ddp(planned):
    """With surrogate training, the ranks' DDP replicas are compared after every round; the result passes check."""
    deltas = _optimised(planned, ["-o", "694", "--surrogate-iters", "2", "-num_gpus", "2"])
    assert len(deltas) == 4
    assert check_cli.main(["-d", str(SRC), "-pd", "694"]) == 0


def test_torchrun_processes_form_one_group(planned):
    """Under torchrun (the launcher for several nodes) each process runs the command; one dataset is written."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "nnunet_voxshield.cli.protect", "-d", str(SRC), "-o", "696", "-device", "cpu", "--rounds", "1",
            "--probe-every", "0",
            "--surrogate-iters", "1", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "The world size is 2" in run.stdout and run.stdout.count("voxshield: wrote") == 1
    assert check_cli.main(["-d", str(SRC), "-pd", "696"]) == 0
