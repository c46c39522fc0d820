"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else by setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or "".join(path.suffixes))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; released data must be readable like any other
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) and getattr(e, "errno", None) is None \
                and shutil.disk_usage(path.parent).free < 2 ** 20:
            # torch.save and np.save report a full disk without an errno; say what it is
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def save_json(obj, path: str | Path) -> None:
    atomic_write(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2, default=_jsonable)))


def save_npy(arr: np.ndarray, path: str | Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(path, write, suffix=".npy")


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
