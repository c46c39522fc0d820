"""Does `nnUNetv2_voxshield_protect` fit CT-sized cases? Time per round and peak memory on int16 512 x 512 x 60 CT.

What it does, all in a work folder with its own nnUNet_raw / nnUNet_preprocessed / nnUNet_results (a temporary
folder unless --work is given):

1. Writes a raw CT dataset `Dataset<id>_CTScale`: --cases int16 volumes of 512 x 512 x 60 voxels, 5 mm slices, and
   in-plane spacings spread over 0.70-0.80 mm, so that the cases' spacings differ and nnU-Net resamples every case
   in-plane (with equal spacings the target spacing is each case's own and the resampler is the identity). Content:
   air (-1000 HU) around a body ellipse with subcutaneous fat, muscle, a liver (label 1) with a small lesion
   (label 2), lungs in the upper slices, a vertebra with cortical and cancellous bone, Gaussian noise of 12 HU.
2. Runs stock `nnUNetv2_plan_and_preprocess -d <id> -c 3d_fullres` (nnUNet_n_proc_DA unset: nnunetv2 2.8.1 fails
   with 0 there).
3. Times one forward + backward of the whole-case resampling `Resampler.__call__` on a float32 tensor of each
   distinct case geometry (the real ones, read from the preprocessed case properties and the plans), in a fresh
   subprocess each, for the current `Resampler` and for the dense per-axis matrices applied with `movedim` + `@` (the
   original implementation, kept here as the reference). Memory is the peak RSS (VmHWM, reset just before the call)
   above the RSS before it, with glibc's default allocator and with its mmap threshold fixed at 1 MiB (freed buffers
   then leave the process, so the peak is that of the live tensors). With --network, also times the planned
   3d_fullres network alone on one planned batch: a training step's forward + backward, an input-gradient pass (the
   noise step's) and a forward pass without gradients, with CPU seconds and peak RSS.
4. Runs `nnUNetv2_voxshield_protect -d <id> -device cpu --rounds R --surrogate-iters S --roi all [--protect-args]`
   with nnUNet_n_proc_DA=0 and nnUNet_def_n_proc=2 under `/usr/bin/time -v`, polls the memory (RSS and PSS) and CPU
   time of its process tree every 0.5 s, and timestamps its progress bars (stderr) to split the run into phases:
   preparing cases, each round (surrogate steps, then the noise pass over the cases) and the export. A run that
   exceeds --timeout is stopped, and what it reached is recorded.

Every command runs the code of the tree this script lives in (its root goes first on PYTHONPATH), whatever copy of
the plugin is installed; `resampling_module_used` records the file. The result is written to
`--out/ct_scale_<date>[_<tag>].json`, with the commands, machine, load and versions. `--reparse RESULT WORK`
recomputes a result's phases from the run's `WORK/protect.log`.

    python benchmarks/ct_scale.py --tag after --protect-args='--probe-every 0'
"""
import argparse
import datetime
import json
import os
import pickle
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHAPE_ZYX = (60, 512, 512)
SLICE_MM = 5.0
INPLANE_MM = (0.70, 0.80)  # spread over the cases
LABELS = {"background": 0, "liver": 1, "lesion": 2}
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the dataset -----------------------------------------------------------------------------------------------------
def inplane_spacings(n_cases: int) -> list[float]:
    return [round(float(s), 3) for s in np.linspace(*INPLANE_MM, n_cases)]


def ct_phantom(spacing_xy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU image and uint8 labels, [z, y, x], anatomy laid out in millimetres so that spacings differ."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = SHAPE_ZYX
    z = (np.arange(nz) - nz / 2 + 0.5) * SLICE_MM
    y = (np.arange(ny) - ny / 2 + 0.5) * spacing_xy
    x = (np.arange(nx) - nx / 2 + 0.5) * spacing_xy
    zz, yy, xx = np.meshgrid(z.astype(np.float32), y.astype(np.float32), x.astype(np.float32), indexing="ij",
                             sparse=True)
    shift_x, shift_y = rng.uniform(-8, 8, 2)
    xx, yy = xx - shift_x, yy - shift_y
    width = 150 + 8 * np.cos(zz / 90)  # semi-axes of the body (mm), slowly varying along z
    height = 105 + 6 * np.sin(zz / 70)
    body_r = (xx / width) ** 2 + (yy / height) ** 2
    img = np.full(SHAPE_ZYX, -1000, np.float32)
    body_r = np.broadcast_to(body_r, SHAPE_ZYX)
    img[body_r <= 1] = -100                                   # subcutaneous fat
    inner = np.broadcast_to((xx / (width - 15)) ** 2 + (yy / (height - 15)) ** 2 <= 1, SHAPE_ZYX)
    img[inner] = 45                                           # muscle / soft tissue
    lungs = (((np.abs(xx) - 70) / 55) ** 2 + ((yy + 10) / 65) ** 2 <= 1) & (zz > 60) & inner
    img[lungs] = -850
    liver = np.broadcast_to(((xx + 60) / 75) ** 2 + ((yy + 5) / 60) ** 2 + ((zz + 10) / 90) ** 2 <= 1, SHAPE_ZYX)
    img[liver & ~lungs] = 60
    lesion_c = rng.uniform([-20, -75, -15], [20, -45, 15])   # z, x, y centre (mm) inside the liver
    lesion = ((zz - lesion_c[0]) ** 2 + (xx - lesion_c[1]) ** 2 + (yy - lesion_c[2]) ** 2) <= 11.0 ** 2
    img[lesion] = 110
    vert = np.broadcast_to(xx ** 2 + (yy - 70) ** 2, SHAPE_ZYX)
    img[vert <= 20.0 ** 2] = 1000                            # cortical shell
    img[vert <= 16.0 ** 2] = 300                             # cancellous bone
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    img[body_r > 1] = -1000 + rng.normal(0, 5, int((body_r > 1).sum()))  # air: no body texture
    seg = np.zeros(img.shape, np.uint8)
    seg[liver & ~lungs] = LABELS["liver"]
    seg[lesion] = LABELS["lesion"]
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), seg


def write_dataset(raw: Path, dataset_id: int, n_cases: int) -> dict:
    import SimpleITK as sitk
    folder = raw / f"Dataset{dataset_id:03d}_CTScale"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = []
    for i, sp in enumerate(inplane_spacings(n_cases)):
        img, seg = ct_phantom(sp, seed=i)
        for arr, path in ((img, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"),
                          (seg, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((sp, sp, SLICE_MM))
            sitk.WriteImage(im, str(path))
        cases.append({"case": f"ct_{i:03d}", "spacing_xyz_mm": [sp, sp, SLICE_MM],
                      "size_xyz": [SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0]], "dtype": "int16",
                      "voxels_per_label": {k: int((seg == v).sum()) for k, v in LABELS.items()}})
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": n_cases, "file_ending": ".nii.gz",
        "name": "CTScale", "description": "synthetic int16 CT phantom for the VoxShield scale benchmark"}, indent=2))
    return {"folder": folder.name, "cases": cases}


# ---- running a command and watching it -------------------------------------------------------------------------------
def _tree_memory(root_pid: int) -> tuple[int, int, list]:
    """Sums of VmRSS, of PSS (shared pages split between sharers) and of CPU seconds (user + system, including
    waited-for children) over root_pid and its descendants, and [(pid, rss MiB, pss MiB, command)], from /proc."""
    children = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(p.name))
        except (OSError, IndexError):
            continue
    rss_total, pss_total, cpu, procs, todo = 0, 0, 0.0, [], [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])) / CLK_TCK  # u, s, cu, cs time
            rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            pss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/smaps_rollup").read_text()
                       .splitlines() if line.startswith("Pss:"))
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except (OSError, StopIteration, IndexError):  # gone, or a zombie (CPU time, but no memory)
            continue
        rss_total, pss_total = rss_total + rss, pss_total + pss
        procs.append((pid, round(rss / 2 ** 20), round(pss / 2 ** 20), cmd))
    return rss_total, pss_total, cpu, procs


def run_watched(cmd: list[str], env: dict, timeout: float, log: Path) -> dict:
    """Run cmd under /usr/bin/time -v in its own session; poll its tree's memory; timestamp every output fragment.

    Memory: `gnu_time.max_rss_mib` is the largest peak RSS of any single process of the tree (getrusage);
    `peak_tree_pss_mib` the largest sum of PSS over the tree seen by polling every 0.5 s (RSS sums count pages
    shared by forked workers several times, PSS does not).
    """
    timev = log.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(timev), *cmd]
    t0 = time.time()
    proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    fragments = []  # (seconds since start, stream, text)

    def reader(stream, name):
        # every piece is stamped when it arrives, also one that no line end has closed yet: a progress bar writes
        # "\rtext" and the line end comes only with its next update
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            now = time.time() - t0
            fragments.extend((now, name, p.decode(errors="replace")) for p in re.split(rb"[\r\n]", chunk)
                             if p.strip())

    threads = [threading.Thread(target=reader, args=(s, n), daemon=True)
               for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
    for t in threads:
        t.start()
    peak_rss, peak_pss, peak_procs, peak_t, samples, timed_out = 0, 0, [], None, [], False
    cpu_samples = []  # (seconds since start, CPU seconds of the tree so far)
    while proc.poll() is None:
        rss, pss, cpu, procs = _tree_memory(proc.pid)
        elapsed = time.time() - t0
        cpu_samples.append((elapsed, cpu))
        peak_rss = max(peak_rss, rss)
        if pss > peak_pss:
            peak_pss, peak_procs, peak_t = pss, procs, round(elapsed, 1)
        if not samples or elapsed - samples[-1][0] >= 5:
            samples.append((round(elapsed, 1), round(pss / 2 ** 20)))
        if elapsed > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # the session this function started
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    proc.wait()
    for t in threads:
        t.join(10)
    wall = time.time() - t0
    log.write_text("\n".join(f"{t:9.2f} {s} {x}" for t, s, x in fragments))
    gnu_time = _parse_time_v(timev.read_text()) if timev.is_file() else {}
    return {"command": shlex.join(cmd), "returncode": proc.returncode, "timed_out": timed_out, "timeout_s": timeout,
            "wall_s": round(wall, 1), "peak_tree_pss_mib": round(peak_pss / 2 ** 20, 1),
            "peak_tree_rss_sum_mib": round(peak_rss / 2 ** 20, 1),
            "at_peak_pss": {"t_s": peak_t, "processes_pid_rss_pss_mib_cmd": peak_procs},
            "tree_pss_mib_every_5s": samples, "gnu_time": gnu_time,
            "fragments": fragments, "cpu_samples": cpu_samples}


def _parse_time_v(text: str) -> dict:
    out = {}
    for key, name in (("Maximum resident set size (kbytes)", "max_rss_mib"), ("User time (seconds)", "user_s"),
                      ("System time (seconds)", "system_s"), ("Percent of CPU this job got", "cpu_percent"),
                      ("Elapsed (wall clock) time (h:mm:ss or m:ss)", "elapsed")):
        for line in text.splitlines():
            if line.strip().startswith(key):
                value = line.split(": ", 1)[1].strip()
                out[name] = round(int(value) / 1024, 1) if name == "max_rss_mib" else value
    return out


def phases(fragments: list, cpu_samples: list) -> dict:
    """Phase boundaries from the protect run's tqdm bars: preparing, rounds (surrogate, noise), export.

    `*_s` are wall seconds; `*_cpu_s` the CPU seconds the process tree spent in the same interval (on a loaded
    machine the wall time mostly measures the other processes; the CPU time does not). A round ends when the rounds
    bar counts it, after its checkpoint is saved; the loop leaves the last round before the bar counts it, so that
    one ends at the bar's closing print."""
    cpu_samples = [(t, c) for i, (t, c) in enumerate(cpu_samples)  # a tree caught between exit and reaping
                   if c >= max((c2 for _, c2 in cpu_samples[:i]), default=0.0)]  # reads low: dropped

    def cpu_at(t):
        before = [c for s, c in cpu_samples if s <= t]
        return before[-1] if before else 0.0

    def cpu(t0, t1):
        return None if t0 is None or t1 is None or not cpu_samples else round(cpu_at(t1) - cpu_at(t0), 1)

    def dt(t0, t1):
        return None if t0 is None or t1 is None else round(t1 - t0, 1)

    first, last, counted, noise_done, rounds_prints = {}, {}, {}, {}, []
    for t, stream, text in fragments:
        if stream != "stderr":
            continue
        for key, pattern in (("preparing", r"preparing cases"), ("rounds", r"VoxShield rounds"),
                             ("writing", r"writing protected cases")):
            if re.search(pattern, text):
                first.setdefault(key, t)
                last[key] = t
        if "VoxShield rounds" in text:
            rounds_prints.append(t)
        m = re.search(r"round (\d+) noise", text)
        if m:
            k = int(m.group(1))
            first.setdefault(f"noise{k}", t)
            last[f"noise{k}"] = t
            if "100%" in text:
                noise_done.setdefault(k, t)
        m = re.search(r"VoxShield rounds:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
        if m:
            counted.setdefault(int(m.group(1)), t)
    out = {"preparing_cases_s": _span(first, last, "preparing"),
           "optimisation_started_at_s": None if "rounds" not in first else round(first["rounds"], 1)}
    rounds, start, k = [], first.get("rounds"), 1
    while start is not None and f"noise{k}" in first:
        n0, n1 = first[f"noise{k}"], noise_done.get(k)
        end = counted.get(k)
        if end is None and n1 is not None:  # the last round: the bar's closing print, after the checkpoint
            end = next((t for t in rounds_prints if t > n1 and t >= last["rounds"]), None)
        record = {"round": k, "wall_s": dt(start, end), "cpu_s": cpu(start, end),
                  "surrogate_steps_s": dt(start, n0), "surrogate_steps_cpu_s": cpu(start, n0),
                  "noise_pass_s": dt(n0, n1), "noise_pass_cpu_s": cpu(n0, n1),
                  "after_noise_pass_s": dt(n1, end)}  # the round's record and its checkpoint
        if end is None:
            record.update(unfinished=True, noise_pass_last_progress_s=dt(n0, last[f"noise{k}"]))
            rounds.append(record)
            break
        rounds.append(record)
        start, k = end, k + 1
    out["rounds"] = rounds
    out["writing_protected_cases_s"] = _span(first, last, "writing")
    end = cpu_samples[-1][0] if cpu_samples else None
    if "writing" in first and end is not None:  # export: writing, checking and reporting, until the process ends
        out["export_start_to_exit_s"] = round(end - first["writing"], 1)
        out["export_start_to_exit_cpu_s"] = cpu(first["writing"], end)
    if cpu_samples:
        out["total_cpu_s_polled"] = round(cpu_samples[-1][1], 1)
    return out


def _thin(samples: list, every: float) -> list:
    """(t, value) samples at least `every` seconds apart, and the last one."""
    out = []
    for t, v in samples:
        if not out or t - out[-1][0] >= every:
            out.append((round(t, 2), round(v, 2)))
    if samples and out[-1][0] != round(samples[-1][0], 2):
        out.append((round(samples[-1][0], 2), round(samples[-1][1], 2)))
    return out


def reparse(result: Path, log: Path) -> None:
    """Recompute a result's protect phases from the run's protect.log (and its CPU samples, where recorded)."""
    record = json.loads(result.read_text())
    run = record["protect"]
    fragments = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split(" ", 2) if not line.startswith(" ") else line.strip().split(" ", 2)
        if len(parts) == 3:
            fragments.append((float(parts[0]), parts[1], parts[2]))
    samples = run.get("cpu_s_samples") or []
    new = phases(fragments, samples)
    if not samples:  # CPU figures from the run itself, where its round boundaries were the same
        old = run["phases"]
        for r_new, r_old in zip(new["rounds"], old.get("rounds", [])):
            if r_old.get("cpu_s") is not None and r_old.get("wall_s") == r_new.get("wall_s"):
                r_new["cpu_s"] = r_old["cpu_s"]
            if r_old.get("surrogate_steps_s") == r_new.get("surrogate_steps_s"):
                r_new["surrogate_steps_cpu_s"] = r_old.get("surrogate_steps_cpu_s")
        for key in ("export_start_to_exit_s", "export_start_to_exit_cpu_s", "total_cpu_s", "total_cpu_s_polled"):
            if key in old:
                new[key] = old[key]
        new["note"] = ("recomputed from protect.log by --reparse; per-phase CPU seconds only where the run's own "
                       "phase boundaries were the same (the run kept no CPU samples)")
    run["phases"] = new
    result.write_text(json.dumps(record, indent=1, default=str) + "\n")


def _span(first, last, key):
    return None if key not in first else round(last[key] - first[key], 1)


# ---- the resampler alone ---------------------------------------------------------------------------------------------
def geometries(preprocessed: Path) -> list[dict]:
    """Distinct (cropped shape, spacing) -> (preprocessed shape, target spacing) of the 3d_fullres cases."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    out = {}
    for pkl in sorted((preprocessed / cfg["data_identifier"]).glob("*.pkl")):
        with open(pkl, "rb") as f:
            props = pickle.load(f)
        shape_in = [int(s) for s in props["shape_after_cropping_and_before_resampling"]]
        sp_in = [float(s) for s in props["spacing"]]
        key = (tuple(shape_in), tuple(sp_in))
        out[key] = {"case": pkl.stem, "shape_in": shape_in, "spacing_in": sp_in,
                    "spacing_out": [float(s) for s in cfg["spacing"]], "kwargs": cfg["resampling_fn_data_kwargs"]}
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    for g in out.values():
        g["shape_out"] = [int(s) for s in compute_new_shape(g["shape_in"], g["spacing_in"], g["spacing_out"])]
    return list(out.values())


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def resampler_probe(geometry: dict, impl: str, repeats: int) -> dict:
    """In this (fresh) process: forward + backward of the whole-case resampling, time and peak RSS above start."""
    import torch
    from nnunet_voxshield.nnunet.resampling import Resampler
    g = geometry
    t_build = time.perf_counter()
    r = Resampler(g["shape_in"], g["shape_out"], g["spacing_in"], g["spacing_out"], g["kwargs"])
    if impl == "dense":  # the original implementation: dense per-axis matrices, movedim + matmul
        mats = r.matrices(torch.float32, "cpu")

        def apply(x):
            for a, m in enumerate(mats):
                if m is not None:
                    x = torch.movedim(torch.movedim(x, a - 3, -1) @ m.T, -1, a - 3)
            return x
    else:
        apply = r
    build_s = time.perf_counter() - t_build  # operator construction (matrices from scipy/skimage)
    torch.manual_seed(0)
    x0 = torch.randn(1, *g["shape_in"])
    gy = torch.randn(1, *g["shape_out"])
    times, peaks = [], []
    for _ in range(repeats):
        x = x0.clone().requires_grad_(True)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
        t = time.perf_counter()
        y = apply(x)
        y.backward(gy)
        times.append(time.perf_counter() - t)
        peaks.append(_status_bytes("VmHWM") - before)
        grad_norm = float(x.grad.norm())
        out_norm = float(y.detach().norm())
        del x, y
    return {"impl": impl, "geometry": {k: g[k] for k in ("case", "shape_in", "shape_out", "spacing_in", "spacing_out")},
            "torch_threads": torch.get_num_threads(), "fwd_bwd_s": [round(t, 3) for t in times],
            "fwd_bwd_min_s": round(min(times), 3),
            "peak_rss_above_start_mib": [round(p / 2 ** 20, 1) for p in peaks],
            "input_mib": round(x0.numel() * 4 / 2 ** 20, 1), "output_mib": round(gy.numel() * 4 / 2 ** 20, 1),
            "setup_s": round(build_s, 3), "output_norm": out_norm, "grad_norm": grad_norm}


def network_probe(preprocessed: Path, repeats: int) -> dict:
    """In this (fresh) process: the planned 3d_fullres network on one planned batch (float32, like the CPU run):
    forward + backward with weight gradients (the surrogate's training step), with the input gradient only (the
    noise step), and forward without gradients (the clean logits and the shortcut probe). CPU seconds and peak RSS
    above the RSS before each pass."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(json.loads((preprocessed / "nnUNetPlans.json").read_text()))
    cm = plans.get_configuration("3d_fullres")
    n_labels = len(json.loads((preprocessed / "dataset.json").read_text())["labels"])
    torch.manual_seed(0)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, n_labels, deep_supervision=False)
    x0 = torch.randn(cm.batch_size, 1, *cm.patch_size)
    out = {"patch_size": list(cm.patch_size), "batch_size": cm.batch_size, "torch_threads": torch.get_num_threads(),
           "parameters_millions": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
    for name, weights, input_grad in (("train_step_fwd_bwd", True, False), ("input_grad_fwd_bwd", False, True),
                                      ("forward_no_grad", False, False)):
        for p in net.parameters():
            p.requires_grad_(weights)
        runs = []
        for _ in range(repeats):
            x = x0.clone().requires_grad_(input_grad)
            Path("/proc/self/clear_refs").write_text("5")
            before, wall, cpu = _status_bytes("VmRSS"), time.perf_counter(), time.process_time()
            with torch.set_grad_enabled(weights or input_grad):
                y = net(x)
                if weights or input_grad:
                    y.float().mean().backward()
            runs.append({"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
                         "peak_rss_above_start_mib": round((_status_bytes("VmHWM") - before) / 2 ** 20)})
            del x, y
            net.zero_grad(set_to_none=True)
        out[name] = runs
    return out


ALLOCATORS = {  # glibc's default keeps freed buffers in the heap (RSS then counts them); a fixed 1 MiB mmap
    "glibc default": {},  # threshold returns every freed buffer, so RSS follows the live tensors
    "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)},
}


def run_probes(preprocessed: Path, impls: list[str], repeats: int, env: dict) -> list[dict]:
    results = []
    for g in geometries(preprocessed):
        for allocator, extra in ALLOCATORS.items():
            for impl in impls:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(g), "--probe-impl", impl,
                       "--repeats", str(repeats)]
                p = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True)
                if p.returncode != 0:
                    results.append({"impl": impl, "case": g["case"], "error": p.stderr[-2000:]})
                else:
                    results.append(json.loads(p.stdout.strip().splitlines()[-1]))
                results[-1]["allocator"] = allocator
                print(json.dumps({k: v for k, v in results[-1].items() if k not in ("error", "geometry")}),
                      flush=True)
    return results


# ---- the protect command ---------------------------------------------------------------------------------------------
def needs_continue_training_shim() -> bool:
    """nnunetv2 builds whose nnUNetTrainer.__init__ pops plans["continue_training"] (set by nnU-Net's run_training)
    raise KeyError for trainers built directly from the plans, as the protect command builds its surrogate, unless
    the plugin sets the key itself."""
    import importlib.util
    trainer_src = Path(importlib.util.find_spec("nnunetv2.training.nnUNetTrainer.nnUNetTrainer").origin).read_text()
    plugin_src = "".join(p.read_text() for p in (HERE.parent / "nnunet_voxshield").rglob("*.py"))
    return 'plans.pop("continue_training")' in trainer_src and "continue_training" not in plugin_src


def protect_with_shim(argv: list[str]) -> int:
    """`nnUNetv2_voxshield_protect argv` with plans.setdefault("continue_training", False) before nnU-Net's trainer
    reads it (see needs_continue_training_shim); nothing else changes."""
    import functools
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    original = nnUNetTrainer.__init__

    @functools.wraps(original)  # nnU-Net reads the signature of __init__ to record its arguments
    def init(self, plans, *args, **kwargs):
        plans.setdefault("continue_training", False)
        original(self, plans, *args, **kwargs)

    nnUNetTrainer.__init__ = init
    from nnunet_voxshield.cli.protect import main as protect_main
    sys.argv = ["nnUNetv2_voxshield_protect", *argv]
    return protect_main()


# ---- main ------------------------------------------------------------------------------------------------------------
def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_total_gib": round(mem / 2 ** 20, 1),
            "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg())}


def versions() -> dict:
    from importlib.metadata import version
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("nnunetv2", "numpy", "scipy", "scikit-image", "SimpleITK", "nnunet_voxshield"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - not installed under that name
            out[pkg] = None
    try:
        out["git_head"] = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()
    except OSError:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None, help="work folder (default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--id", type=int, default=871, help="source dataset id [871]")
    p.add_argument("--cases", type=int, default=2, help="training cases (>= 2, spacings differ) [2]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--surrogate-iters", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds before the protect run is stopped [900]")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the resampler forward + backward [3]")
    p.add_argument("--probe-impls", default="current,dense", help="resampler variants to time [current,dense]")
    p.add_argument("--skip-protect", action="store_true", help="dataset, planning and resampler timing only")
    p.add_argument("--protect-args", default="",
                   help="more flags for the protect command, given as --protect-args='--probe-every 0'")
    p.add_argument("--tag", default="", help="suffix of the result file name, e.g. before / after")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-impl", default="current", help=argparse.SUPPRESS)
    p.add_argument("--network", action="store_true",
                   help="also time the planned network alone on one planned batch (a few minutes on 2 CPU cores)")
    p.add_argument("--network-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--protect-shim", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
    p.add_argument("--reparse", nargs=2, metavar=("RESULT_JSON", "WORK_FOLDER"), default=None,
                   help="recompute the protect phases of a result from WORK_FOLDER/protect.log, then exit")
    args = p.parse_args(argv)

    if args.reparse:
        reparse(Path(args.reparse[0]), Path(args.reparse[1]) / "protect.log")
        return 0
    if args.protect_shim is not None:
        return protect_with_shim(args.protect_shim)
    if args.probe:
        print(json.dumps(resampler_probe(json.loads(args.probe), args.probe_impl, args.repeats)))
        return 0
    if args.network_probe:
        print(json.dumps(network_probe(Path(args.network_probe), 2)))
        return 0
    if args.cases < 2:
        p.error("--cases must be >= 2: with one spacing nnU-Net does not resample")

    started = datetime.datetime.now()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="voxshield_ct_scale_"))
    dirs = {n: work / n for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    env.pop("nnUNet_n_proc_DA", None)
    env["PYTHONUNBUFFERED"] = "1"  # progress bars reach the pipe when written, so their timestamps are right
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    record = {"date": started.isoformat(timespec="seconds"), "tag": args.tag,
              "script": "python benchmarks/ct_scale.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "versions": versions(), "work_folder": str(work)}
    try:
        t = time.time()
        record["dataset"] = write_dataset(dirs["nnUNet_raw"], args.id, args.cases)
        record["dataset"]["write_s"] = round(time.time() - t, 1)
        print(f"dataset written in {record['dataset']['write_s']} s", flush=True)

        plan_cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(args.id), "-c", "3d_fullres", "-npfp", "2", "-np", "2"]
        plan = run_watched(plan_cmd, env, 3600, work / "plan.log")
        plan.pop("fragments"), plan.pop("cpu_samples")
        record["plan_and_preprocess"] = plan
        print(f"plan_and_preprocess: {plan['wall_s']} s, rc {plan['returncode']}", flush=True)
        if plan["returncode"] != 0:
            raise SystemExit(f"nnUNetv2_plan_and_preprocess failed; see {work / 'plan.log'}")
        pre = dirs["nnUNet_preprocessed"] / record["dataset"]["folder"]
        plans = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
        record["plans_3d_fullres"] = {k: plans[k] for k in ("patch_size", "batch_size", "spacing",
                                                            "median_image_size_in_voxels")}

        impls = args.probe_impls.split(",")
        record["resampler_fwd_bwd"] = run_probes(pre, impls, args.repeats, env)
        if args.network:
            p_net = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--network-probe", str(pre)],
                                   env=env, capture_output=True, text=True)
            record["network_alone"] = (json.loads(p_net.stdout.strip().splitlines()[-1]) if p_net.returncode == 0
                                       else {"error": p_net.stderr[-2000:]})
            print(json.dumps(record["network_alone"]), flush=True)

        if not args.skip_protect:
            penv = {**env, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "2"}
            cmd = ["nnUNetv2_voxshield_protect", "-d", str(args.id), "-device", "cpu", "--rounds", str(args.rounds),
                   "--surrogate-iters", str(args.surrogate_iters), "--roi", "all", *args.protect_args.split()]
            shim = needs_continue_training_shim()
            if shim:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--protect-shim", *cmd[1:]]
            probe_import = subprocess.run(  # the code the command runs: PYTHONPATH (this tree) before site-packages
                [sys.executable, "-c", "import nnunet_voxshield.nnunet.resampling as r; print(r.__file__)"],
                env=penv, cwd="/", capture_output=True, text=True)
            record["resampling_module_used"] = probe_import.stdout.strip() or probe_import.stderr[-300:]
            record["machine"]["loadavg_before_protect"] = list(os.getloadavg())
            run = run_watched(cmd, penv, args.timeout, work / "protect.log")
            run["continue_training_shim"] = (
                "applied: this nnunetv2 pops plans['continue_training'] in nnUNetTrainer.__init__ and the plugin does "
                "not set it, so the command is run in-process with plans.setdefault('continue_training', False); "
                "equivalent to: nnUNetv2_voxshield_protect " + " ".join(cmd[3:])) if shim else None
            record["machine"]["loadavg_after_protect"] = list(os.getloadavg())
            fragments, cpu_samples = run.pop("fragments"), run.pop("cpu_samples")
            run["cpu_s_samples"] = _thin(cpu_samples, 2.0)
            run["environment"] = "nnUNet_n_proc_DA=0 nnUNet_def_n_proc=2"
            run["phases"] = phases(fragments, cpu_samples)
            run["log_tail"] = [f"{t:.1f} {s} {x}"[:300] for t, s, x in fragments[-25:]]
            out_json = list(dirs["nnUNet_raw"].glob("Dataset*VoxShield/voxshield.json"))
            if out_json:
                vs = json.loads(out_json[0].read_text())
                run["voxshield_json"] = {"history": vs.get("history"), "timings_s": vs.get("timings_s"),
                                         "cases": vs.get("cases")}
            record["protect"] = run
            print(json.dumps({k: run[k] for k in ("wall_s", "returncode", "timed_out", "peak_tree_pss_mib",
                                                  "gnu_time", "phases")}, indent=1), flush=True)
    finally:
        record["total_s"] = round((datetime.datetime.now() - started).total_seconds(), 1)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"ct_scale_{started:%Y%m%d}{'_' + args.tag if args.tag else ''}.json"
        (out / name).write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"wrote {out / name}", flush=True)
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
