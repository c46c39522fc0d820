"""One-line user errors: every expected failure names its fix instead of printing a traceback."""
import functools
import sys


class VoxShieldError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


def cli_errors(main):
    """Turn VoxShieldError into `voxshield: error: ...` on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except VoxShieldError as e:
            print(f"voxshield: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("voxshield: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
    return wrapper
