"""One-line user errors: every expected failure names its fix instead of printing a traceback."""
import errno
import os


class VoxShieldError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


def _filesystem_of(path: str) -> str:
    """The mount point holding `path` (the thing a user can free or remount)."""
    p = os.path.abspath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _output_filesystems() -> str:
    """Where VoxShield writes, for OS errors that carry no file name (shutil's copies, plain writes)."""
    roots = [os.environ[n] for n in ("nnUNet_raw", "nnUNet_results") if os.environ.get(n)]
    return " or ".join(sorted({_filesystem_of(r) for r in roots})) or "the output filesystem"


def os_error_message(e: OSError) -> str | None:
    """One line for the OS errors a user can fix (full disk, permissions); None for the rest."""
    where = e.filename or "nnUNet_raw"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fs = _filesystem_of(e.filename) if e.filename else _output_filesystems()
        return f"disk full: free space on {fs} or point nnUNet_raw elsewhere; rerun to resume"
    if e.errno == errno.EROFS:
        return f"read-only filesystem at {where}: point nnUNet_raw/nnUNet_results to a writable place; rerun to resume"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {where}: fix its permissions or point nnUNet_raw/nnUNet_results elsewhere"
    return None
