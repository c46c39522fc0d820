"""The protected dataset's identity and folder: `DatasetXXX_<Name>VoxShield`, built aside and moved in at the end."""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nnunet_voxshield.errors import VoxShieldError
from nnunet_voxshield.nnunet.env import dataset_id, require_env


def used_ids() -> dict[int, set[str]]:
    """Dataset ids already taken in any nnU-Net folder, with their names."""
    ids: dict[int, set[str]] = {}
    for root in require_env().values():
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir() and (i := dataset_id(d.name, strict=False)) is not None:
                    ids.setdefault(i, set()).add(d.name)
    return ids


def _protected_name(base: str, output_id: int) -> str:
    return f"Dataset{output_id:03d}_{base}VoxShield"


@dataclass
class OutputDataset:
    name: str
    folder: Path

    @property
    def partial(self) -> Path:
        """Where the dataset is written until complete; an interrupted export resumes from it."""
        return self.folder.parent / f".{self.name}.partial"

    @classmethod
    def named(cls, source_name: str, output_id: int | None) -> "OutputDataset":
        """The protected dataset's name and folder. Default id: source id + 100, else the first free id from 600
        (an id already holding this very protected dataset counts as free)."""
        ids = used_ids()
        src_id, base = dataset_id(source_name), source_name.split("_", 1)[1]
        if output_id is None:
            candidates = [src_id + 100] if src_id + 100 <= 999 else []
            candidates += [i for i in range(600, 1000)]
            free = [i for i in candidates if i not in ids or ids[i] == {_protected_name(base, i)}]
            if not free:
                raise VoxShieldError("no free dataset id between 600 and 999; pass one with -o")
            output_id = free[0]
        if not 1 <= output_id <= 999 or output_id == src_id:
            raise VoxShieldError(f"-o must be a dataset id 1-999 other than the source's; got {output_id}")
        name = _protected_name(base, output_id)
        others = ids.get(output_id, set()) - {name}
        if others:
            raise VoxShieldError(f"dataset id {output_id} is already used by {sorted(others)[0]}; choose another -o")
        return cls(name, require_env()["nnUNet_raw"] / name)

    @classmethod
    def choose(cls, source_name: str, output_id: int | None, overwrite: bool) -> "OutputDataset":
        """`named`, refusing an existing folder unless --overwrite and an unwritable nnUNet_raw."""
        out = cls.named(source_name, output_id)
        raw = out.folder.parent
        if out.folder.exists() and not overwrite:
            raise VoxShieldError(f"{out.folder} already exists; add --overwrite to replace it or choose another -o")
        if not os.access(raw, os.W_OK):
            raise VoxShieldError(f"nnUNet_raw ({raw}) is not writable; fix its permissions or point nnUNet_raw elsewhere")
        return out

    def commit(self) -> Path:
        """Move the complete dataset into place (replacing an old one only now, when --overwrite was given)."""
        if self.folder.exists():
            old = self.folder.parent / f".{self.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.folder, old)
            os.replace(self.partial, self.folder)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.folder)
        return self.folder

