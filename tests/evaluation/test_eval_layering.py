"""The `eval` and `phantoms` parsers are built on every `radserve` command: a client-only install (grpcio and
protobuf, no numpy) must still run `radserve read`, asking for help must not load the evaluation's numerics, and
building the parser imports neither package (the bridge's layering test blocks both)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

THIN_CLIENT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"numpy", "torch", "monai", "pydicom", "nibabel", "matplotlib"}:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    from inference.cli import main
    """
)


def test_help_of_every_client_command_needs_neither_numpy_nor_the_server():
    for command in (["read", "--help"], ["eval", "--help"], ["phantoms", "make", "--help"]):
        script = THIN_CLIENT + f"main({command!r})\n"
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        # argparse's --help exits through SystemExit(0) after printing the usage.
        assert result.returncode == 0 and "usage: radserve" in result.stdout, (command, result.stderr)
        assert "blocked" not in result.stderr


def test_building_the_parser_imports_neither_the_evaluation_nor_the_phantoms():
    script = THIN_CLIENT + (
        "from inference.cli import build_parser\nbuild_parser()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('inference.evaluation', 'inference.phantoms')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_package_names_import_lazily():
    script = THIN_CLIENT + "import inference.evaluation as e\nassert e.DatasetError and 'numpy' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
