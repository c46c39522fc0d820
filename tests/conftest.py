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
