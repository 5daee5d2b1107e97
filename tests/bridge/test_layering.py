"""The bridge is a client of the API: it imports neither torch nor MONAI nor any module of the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Allowed of the package: the bridge, the client, the generated stubs (and their parent packages), the CLI package
# (its modules import the server only inside the handlers of server commands).
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    HEAVY = {"torch", "torchvision", "monai", "nibabel", "highdicom", "scipy", "tritonclient"}
    ALLOWED = {"inference", "inference.api", "inference.client"}
    ALLOWED_PACKAGES = ("inference.bridge", "inference.api.gen", "inference.cli")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"blocked: {name}")
            if name.startswith("inference") and name not in ALLOWED and not any(
                name == p or name.startswith(p + ".") for p in ALLOWED_PACKAGES
            ):
                raise ImportError(f"blocked server module: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def test_the_bridge_and_its_commands_import_without_torch_monai_or_the_server(tmp_path):
    script = BLOCKER + textwrap.dedent(
        """
        import importlib, pkgutil
        import inference.bridge
        for module in pkgutil.iter_modules(inference.bridge.__path__):
            importlib.import_module("inference.bridge." + module.name)
        from inference.cli import main
        assert main(["bridge", "--help"]) == 0
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # argparse's --help exits through SystemExit(0) after printing the usage.
    assert "radserve bridge" in result.stdout, result.stderr
    assert "blocked" not in result.stderr and result.returncode == 0, result.stderr

    status = BLOCKER + textwrap.dedent(
        f"""
        from inference.bridge.journal import Journal
        Journal(__import__("pathlib").Path({str(tmp_path / "journal.sqlite3")!r})).close()
        from inference.cli import main
        raise SystemExit(main(["bridge", "status", "--state", {str(tmp_path)!r}]))
        """
    )
    result = subprocess.run([sys.executable, "-c", status], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("discovered 0  queued 0  reading 0")


def test_the_blocker_blocks():
    script = BLOCKER + "import inference.engine.runner\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "blocked" in result.stderr
