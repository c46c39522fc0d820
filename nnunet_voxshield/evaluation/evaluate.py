"""Efficacy, measured: train real nnU-Net victims on the clean and on the protected dataset, score both on clean
held-out cases with nnU-Net's own evaluation, and report Dice side by side (JSON, markdown table, bar chart).

Every step is a stock nnU-Net command (plan/preprocess, train, predict), so anyone can rerun a single victim by hand;
the commands are recorded in the report. Seeds are independent replicates: nnU-Net has no seed option and draws fresh
weights and samples in every process, so seed k > 0 only needs its own results folder, which it gets from a copy of
the plans named `<plans>_seed<k>` (same configurations and preprocessed data, different `plans_name`). Seed 0 uses the
plans as they are, so a victim a user trained by hand is reused. Resuming is per run: finished trainings are detected
by nnU-Net's checkpoint_final.pth, interrupted ones continue with `--c`, and each scored run is cached as a JSON file.
"""
import contextlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, label_or_region_to_key
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.utils import (create_paths_fn, get_filenames_of_train_images_and_targets,
                                      get_identifiers_from_splitted_dataset_folder)

from nnunet_voxshield.job.atomic import atomic_write, save_json
from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.evaluation.diagnostics import ENV as DIAGNOSTICS_ENV
from nnunet_voxshield.evaluation.diagnostics import read_curve
from nnunet_voxshield.nnunet.env import (dataset_id, dataset_name, default_device, ext_trainers_visible,
                                         plan_and_preprocess, require_env, run_nnunet)

KINDS = ("clean", "protected")
EVALUATION_FOLDER = "voxshield_evaluation"


@dataclass(frozen=True)
class Victim:
    """A trainer class and the configuration it trains (`nnUNetTrainerVS_Short:2d` on the command line)."""
    trainer: str
    configuration: str

    @classmethod
    def parse(cls, spec: str, default_configuration: str) -> "Victim":
        trainer, _, configuration = spec.partition(":")
        return cls(trainer, configuration or default_configuration)

    @property
    def name(self) -> str:
        return f"{self.trainer} ({self.configuration})"


@dataclass(frozen=True)
class Run:
    """One real nnU-Net training of one victim on one dataset for one seed, and its prediction of the held-out cases."""
    victim: Victim
    kind: str
    dataset: str
    seed: int
    plans: str
    fold: str

    @property
    def key(self) -> str:
        return f"{self.kind}__{self.victim.trainer}__{self.plans}__{self.victim.configuration}__fold_{self.fold}"

    @property
    def fold_folder(self) -> Path:
        model = f"{self.victim.trainer}__{self.plans}__{self.victim.configuration}"
        return require_env("nnUNet_results")["nnUNet_results"] / self.dataset / model / f"fold_{self.fold}"

    def train_command(self, device: str) -> list[str]:
        return ["nnUNetv2_train", str(dataset_id(self.dataset)), self.victim.configuration, self.fold,
                "-tr", self.victim.trainer, "-p", self.plans, "-device", device, "--c"]

    def predict_command(self, images: Path, output: Path, device: str) -> list[str]:
        return ["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(dataset_id(self.dataset)),
                "-c", self.victim.configuration, "-f", self.fold, "-tr", self.victim.trainer, "-p", self.plans,
                "-device", device, "--disable_tta", "-npp", str(default_num_processes),
                "-nps", str(default_num_processes)]


@dataclass
class HeldOut:
    """Clean cases the victims never train on: `images[case]` lists its channel files, `labels[case]` its label."""
    origin: str
    images: dict
    labels: dict

    def link_into(self, folder: Path, file_ending: str) -> tuple[Path, Path]:
        """nnU-Net-named links to the cases (imagesTs/labelsTs), the input of nnUNetv2_predict and of scoring."""
        image_dir, label_dir = folder / "imagesTs", folder / "labelsTs"
        for d in (image_dir, label_dir):
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                f.unlink()
        for case, files in self.images.items():
            for ch, f in enumerate(files):
                os.symlink(os.path.abspath(f), image_dir / f"{case}_{ch:04d}{file_ending}")
            os.symlink(os.path.abspath(self.labels[case]), label_dir / f"{case}{file_ending}")
        return image_dir, label_dir


# ---------------------------------------------------------------- datasets


def _raw(name: str) -> Path:
    return require_env("nnUNet_raw")["nnUNet_raw"] / name


def _preprocessed(name: str) -> Path:
    return require_env("nnUNet_preprocessed")["nnUNet_preprocessed"] / name


def _load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def channel_files(folder: Path, file_ending: str, cases) -> dict:
    """`{case: [case_0000.ext, ...]}` by nnU-Net's own file-name rule."""
    files = sorted(p.name for p in folder.iterdir())
    return {case: create_paths_fn(str(folder), files, file_ending, case) for case in cases}


def training_cases(name: str, dataset_json: dict) -> dict:
    """`{case: {"images": [...], "label": ...}}` of imagesTr/labelsTr, as nnU-Net lists them.

    nnU-Net's get_filenames_of_train_images_and_targets starts a 12-process pool for the plain folder layout, which
    costs seconds per call on a small machine; that layout is listed here directly with nnU-Net's file-name rule.
    """
    raw = _raw(name)
    if "dataset" in dataset_json:
        return get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    ending = dataset_json["file_ending"]
    cases = [str(c) for c in get_identifiers_from_splitted_dataset_folder(str(raw / "imagesTr"), ending)]
    images = channel_files(raw / "imagesTr", ending, cases)
    return {c: {"images": images[c], "label": str(raw / "labelsTr" / f"{c}{ending}")} for c in cases}


def check_same_cases(source: str, protected: str) -> dict:
    """The protected dataset must be the source's twin (case ids, labels, channels); return the source dataset.json."""
    src_json, prot_json = _load_json(_raw(source) / "dataset.json"), _load_json(_raw(protected) / "dataset.json")
    for field in ("labels", "channel_names", "file_ending"):
        if src_json[field] != prot_json[field]:
            raise VoxShieldError(f"{protected} and {source} differ in dataset.json '{field}'; -pd must be a protected "
                                 f"copy of -d (as written by nnUNetv2_voxshield_protect)")
    src_cases, prot_cases = set(training_cases(source, src_json)), set(training_cases(protected, prot_json))
    if src_cases != prot_cases:
        raise VoxShieldError(f"{protected} and {source} have different training cases "
                             f"({len(src_cases ^ prot_cases)} differ); -pd must be a protected copy of -d")
    return src_json


def labelled_test_set(source: str, dataset_json: dict) -> HeldOut:
    """imagesTs/labelsTs of the source: every labelled test case with all its channels."""
    raw, ending = _raw(source), dataset_json["file_ending"]
    label_dir, image_dir = raw / "labelsTs", raw / "imagesTs"
    labels = {f.name[:-len(ending)]: str(f) for f in sorted(label_dir.glob(f"*{ending}"))} \
        if label_dir.is_dir() else {}
    if not labels or not image_dir.is_dir():
        raise VoxShieldError(f"{source} has no labelled test cases (imagesTs + labelsTs) to score victims on; add "
                             f"them, or pass --holdout-val to score on the fold's validation cases instead")
    images = channel_files(image_dir, ending, labels)
    n_channels = len(dataset_json["channel_names"])
    incomplete = [case for case, f in images.items() if len(f) != n_channels]
    if incomplete:
        raise VoxShieldError(f"{image_dir} lacks channel files for {len(incomplete)} labelled case(s), e.g. "
                             f"{incomplete[0]}_0000{ending}; add them or remove their labelsTs file")
    return HeldOut(f"imagesTs/labelsTs of {source}", images, labels)


def fold_validation_set(datasets: tuple[str, ...], fold: str, dataset_json: dict) -> HeldOut:
    """The fold's validation cases, taken from the CLEAN source: neither victim trains on them.

    The split is nnU-Net's own (splits_final.json, created here exactly as nnU-Net would if absent) and must be the
    same in both datasets, otherwise the protected victim would train on cases the clean one is scored on.
    """
    cases = training_cases(datasets[0], dataset_json)
    val_sets = []
    for name in datasets:
        splits_file = _preprocessed(name) / "splits_final.json"
        if not splits_file.is_file():
            save_json(generate_crossval_split(sorted(cases), seed=12345, n_splits=5), splits_file)
        splits = _load_json(splits_file)
        if int(fold) >= len(splits):
            raise VoxShieldError(f"{splits_file} has {len(splits)} folds; choose -f below {len(splits)}")
        val_sets.append(sorted(splits[int(fold)]["val"]))
    if val_sets[0] != val_sets[1]:
        raise VoxShieldError(f"fold {fold} validation cases differ between {datasets[0]} and {datasets[1]}; copy "
                             f"{_preprocessed(datasets[0]) / 'splits_final.json'} to {_preprocessed(datasets[1])}")
    return HeldOut(f"fold {fold} validation cases of {datasets[0]} (imagesTr)",
                   {c: cases[c]["images"] for c in val_sets[0]}, {c: cases[c]["label"] for c in val_sets[0]})


def ensure_preprocessed(name: str, configuration: str, plans: str, case_ids, log) -> None:
    """Stock planning and preprocessing, run only for what is missing (a complete data folder is reused)."""
    plans_file = _preprocessed(name) / f"{plans}.json"
    if not plans_file.is_file():
        if plans != "nnUNetPlans":
            raise VoxShieldError(f"{plans_file} not found; plan {name} with the planner that writes {plans} first")
        log(f"planning and preprocessing {name} ({configuration})")
        plan_and_preprocess(dataset_id(name), (configuration,), default_num_processes)
    configurations = _load_json(plans_file)["configurations"]
    if configuration not in configurations:
        raise VoxShieldError(f"configuration {configuration} not in {plans_file}; choose one of "
                             f"{', '.join(configurations)}")
    if configurations[configuration].get("previous_stage"):
        raise VoxShieldError(f"{configuration} is a cascade stage; evaluate with 2d, 3d_fullres or 3d_lowres")
    data_identifier = configurations[configuration].get("data_identifier", f"{plans}_{configuration}")
    done = {p.stem for p in (_preprocessed(name) / data_identifier).glob("*.pkl")}
    if not set(case_ids) <= done:
        log(f"preprocessing {name} ({configuration})")
        run_nnunet(["nnUNetv2_preprocess", "-d", str(dataset_id(name)), "-plans_name", plans, "-c", configuration,
                    "-np", str(default_num_processes)], planning=True)


def seed_plans(name: str, plans: str, seed: int) -> str:
    """Plans identifier of replicate `seed`: the plans themselves for 0, else a copy with its own plans_name."""
    if seed == 0:
        return plans
    identifier = f"{plans}_seed{seed}"
    content = _load_json(_preprocessed(name) / f"{plans}.json")
    content["plans_name"] = identifier
    target = _preprocessed(name) / f"{identifier}.json"
    if not target.is_file() or _load_json(target) != content:
        save_json(content, target)
    return identifier


# ---------------------------------------------------------------- victims


def describe_trainer(trainer: str) -> str:
    """First paragraph of the trainer's docstring (found exactly as nnU-Net finds it), for the report."""
    try:
        with ext_trainers_visible(), contextlib.redirect_stdout(io.StringIO()):
            cls = recursive_find_trainer_class_by_name(trainer)
    except (RuntimeError, AssertionError):
        raise VoxShieldError(f"trainer {trainer} not found by nnU-Net (nor in nnUNet_extTrainer); check -tr, e.g. "
                             f"nnUNetTrainer or nnUNetTrainerVS_Short") from None
    if cls.__doc__:
        return " ".join(cls.__doc__.strip().split("\n\n")[0].split())
    return "nnU-Net's stock trainer, default augmentation." if trainer == "nnUNetTrainer" else \
        f"nnU-Net trainer {trainer}."


def trained_schedule(run: Run) -> str:
    """`epochs x iterations` as the trainer actually used them (nnU-Net's debug.json of the run)."""
    debug = run.fold_folder / "debug.json"
    if not debug.is_file():
        return "?"
    d = _load_json(debug)
    return f"{d.get('num_epochs', '?')} x {d.get('num_iterations_per_epoch', '?')}"


def _as_key(value) -> str:
    if isinstance(value, (list, tuple)):
        return label_or_region_to_key(tuple(int(v) for v in value) if len(value) > 1 else int(value[0]))
    return label_or_region_to_key(int(value))


def score(predictions: Path, references: Path, dataset_json: dict) -> dict:
    """Dice per label (by name) and foreground mean, computed by nnU-Net's compute_metrics_on_folder."""
    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    targets = manager.foreground_regions if manager.has_regions else manager.foreground_labels
    example = next(references.iterdir())
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()
    metrics = compute_metrics_on_folder(str(references), str(predictions), None, reader, dataset_json["file_ending"],
                                        targets, manager.ignore_label, num_processes=default_num_processes)
    names = {_as_key(v): k for k, v in dataset_json["labels"].items() if k not in ("background", "ignore")}

    def finite(x):
        return None if x is None or not np.isfinite(x) else float(x)

    dice = {names[label_or_region_to_key(t)]: finite(metrics["mean"][t]["Dice"]) for t in targets}
    per_case = {Path(c["prediction_file"]).name: {names[label_or_region_to_key(t)]: finite(c["metrics"][t]["Dice"])
                                                  for t in targets} for c in metrics["metric_per_case"]}
    return {"dice": dice, "mean_dice": finite(metrics["foreground_mean"]["Dice"]), "per_case": per_case}


def _checkpoint(run: Run) -> Path:
    return run.fold_folder / "checkpoint_final.pth"


def execute(run: Run, heldout_dirs: tuple[Path, Path], work: Path, dataset_json: dict, device: str, log,
            verbose: bool, diagnostics: Path | None = None) -> dict:
    """Train (or reuse), predict and score one run; the scored record is cached so an interrupted evaluation resumes."""
    images, labels = heldout_dirs
    cases = sorted(p.name[:-len(dataset_json["file_ending"])] for p in labels.iterdir())
    record_file = work / "runs" / f"{run.key}.json"
    if record_file.is_file() and _checkpoint(run).is_file():
        record = _load_json(record_file)
        if (record["dataset"], record["heldout_cases"], record["checkpoint_mtime"]) == \
                (run.dataset, cases, _checkpoint(run).stat().st_mtime):
            return record
    record = {"key": run.key, "kind": run.kind, "dataset": run.dataset, "trainer": run.victim.trainer,
              "configuration": run.victim.configuration, "plans": run.plans, "seed": run.seed, "fold": run.fold,
              "heldout_cases": cases, "train_command": " ".join(run.train_command(device)), "train_seconds": None}
    if not _checkpoint(run).is_file():
        log(f"training {run.victim.name} on {run.dataset} ({run.kind}, seed {run.seed})")
        started = time.time()
        run_nnunet(run.train_command(device), quiet=not verbose,
                   extra_env={DIAGNOSTICS_ENV: str(diagnostics)} if diagnostics else None)
        record["train_seconds"] = round(time.time() - started, 1)
    predictions = work / "predictions" / run.key
    shutil.rmtree(predictions, ignore_errors=True)  # a half-written prediction from an interrupted run is not reused
    log(f"predicting the held-out cases with {run.victim.name} trained on {run.dataset} (seed {run.seed})")
    started = time.time()
    run_nnunet(run.predict_command(images, predictions, device), quiet=not verbose)
    record["predict_seconds"] = round(time.time() - started, 1)
    record["predict_command"] = " ".join(run.predict_command(images, predictions, device))
    record.update(score(predictions, labels, dataset_json))
    record["schedule"] = trained_schedule(run)
    record["curve"] = read_curve(run.fold_folder)
    record["checkpoint_mtime"] = _checkpoint(run).stat().st_mtime
    save_json(record, record_file)
    return record


# ---------------------------------------------------------------- summary and report files


def seed_stats(values: list) -> dict:
    """Mean and sample standard deviation over seeds (std is None for a single seed)."""
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None,
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "values": values}


def _ratio(clean: dict, protected: dict):
    c, p = clean["mean"], protected["mean"]
    return None if c is None or p is None or c == 0 else p / c


def summarise_victims(records: list[dict], victims: list[Victim], descriptions: dict, label_names: list[str]) -> list[dict]:
    """Per victim and label: clean and protected Dice over seeds, and their ratio."""
    summary = []
    for victim in victims:
        mine = [r for r in records if (r["trainer"], r["configuration"]) == (victim.trainer, victim.configuration)]
        by_kind = {k: sorted((r for r in mine if r["kind"] == k), key=lambda r: r["seed"]) for k in KINDS}
        labels = {}
        for label in [*label_names, "mean"]:
            stats = {k: seed_stats([r["mean_dice"] if label == "mean" else r["dice"][label] for r in by_kind[k]])
                     for k in KINDS}
            labels[label] = {**stats, "ratio": _ratio(stats["clean"], stats["protected"])}
        summary.append({"victim": victim.name, "trainer": victim.trainer, "configuration": victim.configuration,
                        "description": descriptions[victim.trainer],
                        "schedule": by_kind["clean"][0]["schedule"] if by_kind["clean"] else "?",
                        "labels": labels})
    return summary


def _fmt(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["std"] is not None else "")


def markdown(report: dict) -> str:
    lines = [f"# VoxShield evaluation: {report['protected']} vs {report['source']}", "",
             f"Dice of nnU-Net victims on {len(report['heldout']['cases'])} clean held-out cases "
             f"({report['heldout']['origin']}), fold {report['fold']}, {report['seeds']} seed(s): mean ± sample std "
             f"over seeds. Protected/clean is the ratio of mean Dice: 1 means no protection, 0 full protection.", "",
             "| Victim | Schedule (epochs x iterations) | Label | Clean Dice | Protected Dice | Protected/clean |",
             "|---|---|---|---:|---:|---:|"]
    for v in report["victims"]:
        for i, (label, s) in enumerate(v["labels"].items()):
            name = "**mean**" if label == "mean" else label
            ratio = "n/a" if s["ratio"] is None else f"{s['ratio']:.2f}"
            lines.append(f"| {v['victim'] if i == 0 else ''} | {v['schedule'] if i == 0 else ''} | {name} | "
                         f"{_fmt(s['clean'])} | {_fmt(s['protected'])} | {ratio} |")
    lines += ["", "Victims:", ""] + [f"- `{v['trainer']}` ({v['configuration']}): {v['description']}"
                                     for v in report["victims"]]
    curves = [r for r in report["runs"] if r.get("curve")]
    if curves:
        lines += ["", "Shortcut or slowdown, at the end of training (Dice on nnU-Net's preprocessed grid; a shortcut is "
                  "high Dice on the run's own protected training cases and low Dice on clean held-out cases):", "",
                  "| Victim | Trained on | Seed | Own training cases | Clean held-out | Gap |", "|---|---|---:|---:|---:|---:|"]
        for r in curves:
            last = r["curve"][-1]
            own, clean = last["dice_own_training_cases"], last["dice_clean_heldout"]
            gap = "n/a" if own is None or clean is None else f"{own - clean:+.3f}"
            lines.append(f"| {r['trainer']} ({r['configuration']}) | {r['kind']} | {r['seed']} | "
                         f"{_fmt({'mean': own, 'std': None})} | {_fmt({'mean': clean, 'std': None})} | {gap} |")
    lines += ["", "Commands (run with `nnUNet_extTrainer=$(nnUNetv2_voxshield_trainers_path)`; plans `*_seedK` are "
              "copies of the plans with their own plans_name, one results folder per seed):", "", "```"]
    lines += [c for r in report["runs"] for c in (r["train_command"], r["predict_command"])] + ["```", ""]
    return "\n".join(lines)


def bar_chart(report: dict, path: Path) -> None:
    """Mean foreground Dice per victim, clean vs protected, error bars = std over seeds."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless
    victims = report["victims"]
    x = np.arange(len(victims))
    fig = Figure(figsize=(max(4.0, 1.6 * len(victims) + 1.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    for offset, kind, color in ((-0.2, "clean", "#4C72B0"), (0.2, "protected", "#C44E52")):
        stats = [v["labels"]["mean"][kind] for v in victims]
        spread = [s["std"] or 0 for s in stats] if any(s["std"] is not None for s in stats) else None
        ax.bar(x + offset, [s["mean"] or 0 for s in stats], 0.4, yerr=spread, capsize=3,
               label=f"trained on {kind} data", color=color)
    ax.set_xticks(x, [v["victim"].replace(" (", "\n(") for v in victims], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean Dice on clean held-out cases")
    ax.set_title(f"{report['protected']} vs {report['source']}", fontsize=9)
    ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png")


def curves_chart(report: dict, path: Path) -> None:
    """Per victim: Dice on its own training cases (dashed) and on clean held-out cases (solid) over training, for the
    clean-trained and the protected-trained runs on one plot, and their training losses below. A shortcut is a wide
    gap between the protected run's two Dice curves."""
    from matplotlib.figure import Figure
    victims = report["victims"]
    fig = Figure(figsize=(4.2 * len(victims), 6.0), layout="constrained")
    axes = fig.subplots(2, len(victims), squeeze=False)
    for column, v in enumerate(victims):
        dice_ax, loss_ax = axes[0][column], axes[1][column]
        for r in report["runs"]:
            if (r["trainer"], r["configuration"]) != (v["trainer"], v["configuration"]) or not r.get("curve"):
                continue
            color = "#4C72B0" if r["kind"] == "clean" else "#C44E52"
            its = [p["iterations"] for p in r["curve"]]
            label = f"{r['kind']} data, seed {r['seed']}"
            dice_ax.plot(its, [p["dice_clean_heldout"] for p in r["curve"]], "-", color=color,
                         label=f"{label}: clean held-out")
            dice_ax.plot(its, [p["dice_own_training_cases"] for p in r["curve"]], "--", color=color,
                         label=f"{label}: own training cases")
            loss_ax.plot(its, [p["train_loss"] for p in r["curve"]], "-", color=color, label=label)
        dice_ax.set_ylim(0, 1)
        dice_ax.set_title(v["victim"], fontsize=9)
        dice_ax.set_ylabel("mean Dice (preprocessed grid)")
        loss_ax.set_xlabel("training iterations")
        loss_ax.set_ylabel("training loss (Dice + CE)")
        dice_ax.legend(fontsize=6)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")


# ---------------------------------------------------------------- the command


def evaluate(source, protected, trainers=("nnUNetTrainer",), configuration: str = "3d_fullres", fold: str = "0",
             seeds: int = 3, device: str | None = None, plans: str = "nnUNetPlans", output: str | Path | None = None,
             holdout_val: bool = False, verbose: bool = False, log=print) -> dict:
    """Run (or resume) the whole evaluation; write evaluation.json/.md/.png and return the report dict."""
    dirs = require_env()
    source, protected = dataset_name(source), dataset_name(protected)
    if source == protected:
        raise VoxShieldError("-d and -pd name the same dataset; -pd is the protected copy written by "
                             "nnUNetv2_voxshield_protect")
    if seeds < 1:
        raise VoxShieldError("--seeds must be at least 1")
    fold, device = str(fold), device or default_device()
    if holdout_val and fold == "all":
        raise VoxShieldError("--holdout-val needs a cross-validation fold (-f 0..4); -f all trains on every case")
    victims = list(dict.fromkeys(Victim.parse(t, configuration) for t in trainers))
    descriptions = {v.trainer: describe_trainer(v.trainer) for v in victims}
    dataset_json = check_same_cases(source, protected)
    case_ids = list(training_cases(source, dataset_json))
    work = Path(output) if output else dirs["nnUNet_results"] / protected / EVALUATION_FOLDER

    heldout = None if holdout_val else labelled_test_set(source, dataset_json)  # fail before hours of work
    for name in (source, protected):
        for cfg in dict.fromkeys(v.configuration for v in victims):
            ensure_preprocessed(name, cfg, plans, case_ids, log)
    heldout = heldout or fold_validation_set((source, protected), fold, dataset_json)
    heldout_dirs = heldout.link_into(work / "heldout", dataset_json["file_ending"])
    diagnostics = work / "diagnostics.json"
    save_json({"every": 0, "train_cases": 4,
               "heldout": [{"images": heldout.images[c], "label": heldout.labels[c]} for c in sorted(heldout.labels)]},
              diagnostics)

    runs = [Run(v, kind, name, seed, seed_plans(name, plans, seed), fold)
            for v in victims for seed in range(seeds) for kind, name in zip(KINDS, (source, protected))]
    records = []
    for i, run in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {run.victim.name}, {run.kind} data, seed {run.seed}")
        records.append(execute(run, heldout_dirs, work, dataset_json, device, log, verbose, diagnostics))

    label_names = list(records[0]["dice"])
    report = {"source": source, "protected": protected, "configuration": configuration, "fold": fold,
              "seeds": seeds, "plans": plans, "device": device,
              "heldout": {"origin": heldout.origin, "cases": sorted(heldout.labels)},
              "victims": summarise_victims(records, victims, descriptions, label_names), "runs": records}
    save_json(report, work / "evaluation.json")
    atomic_write(work / "evaluation.md", lambda tmp: Path(tmp).write_text(markdown(report)))
    bar_chart(report, work / "evaluation.png")
    curves_chart(report, work / "evaluation_curves.png")
    log(f"wrote {work / 'evaluation.md'} (+ .json, .png, _curves.png)")
    return report
