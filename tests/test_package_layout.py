"""The package's architecture holds: sub-packages by concern, imports only downwards, no import-time side effects."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_voxshield"
LAYERS = ["nnunet", "method", "job", "release", "evaluation", "demo", "cli"]
"""Lowest first: a sub-package may import those before it (and config, errors), never those after it."""


def imported_subpackages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "nnunet_voxshield" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_only_config_and_errors_live_at_the_top():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "config.py", "errors.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_downwards_only(layer):
    allowed = {"config", "errors", "__version__", *LAYERS[:LAYERS.index(layer) + 1]}
    for module in (PACKAGE / layer).glob("*.py"):
        assert imported_subpackages(module) <= allowed, f"{module.name} imports {imported_subpackages(module) - allowed}"
    assert len((PACKAGE / layer / "__init__.py").read_text().split("\n\n")[0]) > 100, "say what lives here"


def test_config_and_errors_import_nothing_heavy():
    for name in ("config.py", "errors.py"):
        assert imported_subpackages(PACKAGE / name) <= {"errors"}


def test_command_line_parses_before_torch_is_imported():
    code = ("import sys; import nnunet_voxshield.cli.protect, nnunet_voxshield.cli.evaluate, "
            "nnunet_voxshield.cli.check, nnunet_voxshield.cli.demo; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_importing_the_package_changes_no_process_state():
    nnunet_vars = "{k: v for k, v in os.environ.items() if k.startswith('nnUNet')}"  # torch and blosc2 set their own
    code = (f"import os; os.umask(0o027); before = {nnunet_vars}; "
            "import nnunet_voxshield.release.protect, nnunet_voxshield.evaluation.evaluate; "
            f"m = os.umask(0o022); print(oct(m), {nnunet_vars} == before)")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-2:] == ["0o27", "True"]
