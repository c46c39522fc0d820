import os
import sys
from pathlib import Path

import pytest

# 2-core CPU settings for every nnU-Net call made by the tests
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_compile", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders for one test."""
    dirs = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        d = tmp_path / name
        d.mkdir()
        monkeypatch.setenv(name, str(d))
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def nnunet_module_dirs(tmp_path_factory):
    """nnUNet_* folders shared by one test module (planning is too slow to repeat per test)."""
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        dirs = {}
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            dirs[name] = root / name
            dirs[name].mkdir()
            mp.setenv(name, str(dirs[name]))
        yield dirs
