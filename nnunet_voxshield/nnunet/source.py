"""The source dataset as nnU-Net sees it: raw files, plans, configuration and preprocessed data, validated."""
from dataclasses import dataclass
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.nnunet.env import dataset_name, require_env


@dataclass
class Source:
    name: str
    raw: Path
    preprocessed: Path
    plans_file: Path
    plans: dict
    plans_manager: PlansManager
    configuration: str
    configuration_manager: ConfigurationManager
    dataset_json: dict
    files: dict          # identifier -> {"images": [...], "label": path}

    @property
    def identifiers(self) -> list[str]:
        return sorted(self.files)

    def preprocessed_dataset(self, identifiers: list[str] | None = None):
        """nnU-Net's own dataset object over the preprocessed (clean) training cases (or the given ones)."""
        folder = self.preprocessed / self.configuration_manager.data_identifier
        return infer_dataset_class(str(folder))(str(folder), identifiers or self.identifiers)


def load_source(dataset, configuration: str = "3d_fullres", plans: str = "nnUNetPlans") -> Source:
    """Resolve `-d/-c/-p` like nnU-Net does and check the dataset is planned and preprocessed for them."""
    env = require_env()
    name = dataset_name(dataset)
    raw = env["nnUNet_raw"] / name
    if not (raw / "dataset.json").is_file():
        raise VoxShieldError(f"{raw} has no dataset.json; is -d {dataset} a raw nnU-Net dataset?")
    pre = env["nnUNet_preprocessed"] / name
    plans_file = pre / f"{plans}.json"
    if not plans_file.is_file():
        raise VoxShieldError(f"{name} is not planned with {plans}; run nnUNetv2_plan_and_preprocess -d {dataset} "
                             f"-c {configuration} first")
    plans_dict = load_json(str(plans_file))
    pm = PlansManager(plans_dict)
    available = list(plans_dict["configurations"])
    if configuration not in available:
        raise VoxShieldError(f"configuration {configuration!r} is not in {plans_file.name} (has: "
                             f"{', '.join(available)}); pick one with -c")
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise VoxShieldError(f"configuration {configuration!r} is 2d; VoxShield needs a 3d configuration "
                             f"(plan with -c 3d_fullres)")
    data_folder = pre / cm.data_identifier
    if not data_folder.is_dir() or not any(data_folder.iterdir()):
        raise VoxShieldError(f"{name} is planned but not preprocessed for {configuration}; run "
                             f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}")
    dataset_json = load_json(str(raw / "dataset.json"))
    files = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    if not files:
        raise VoxShieldError(f"{raw}/imagesTr holds no training cases ending in {dataset_json.get('file_ending')}")
    missing = [i for i in files if not Path(files[i]["label"]).is_file()]
    if missing:
        raise VoxShieldError(f"label file missing for {len(missing)} case(s), e.g. {missing[0]}; "
                             f"run nnUNetv2_plan_and_preprocess --verify_dataset_integrity")
    missing = [f for i in files for f in files[i]["images"] if not Path(f).is_file()]
    if missing:
        raise VoxShieldError(f"image file missing: {missing[0]}; every case needs one file per channel")
    return Source(name, raw, pre, plans_file, plans_dict, pm, configuration, cm, dataset_json, files)
