"""The tree keeps the architecture docs/architecture.md describes: imports run down the layers, backends are called
through their interface, torch.cuda stays in its two places, modules stay small.

Static checks over the source (no import of the package): fast, and a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "inference"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 500
SIZE_REASON = "Over 500 lines:"
PROBES = ("getattr", "hasattr")
CUDA_ALLOWED = ("backends/", "platform.py", "triton/python_model.py")


def _block(name: str) -> list[list[str]]:
    match = re.search(rf"```{name}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/architecture.md has no ```{name} block"
    return [line.split() for line in match.group(1).splitlines() if line.strip()]


LAYERS = _block("layers")
RANK = {unit: rank for rank, line in enumerate(LAYERS) for unit in line}
STUB_USERS = {unit for line in _block("stub-users") for unit in line}


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "gen" not in p.relative_to(PACKAGE).parts[:2])


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name under ``inference``: ``api.gen``, a subpackage or top-level module."""
    parts = module.split(".")
    if parts[1:3] == ["api", "gen"]:
        return "api.gen"
    return parts[1] if len(parts) > 1 else "inference"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an ``inference`` module in ``path`` (``from a import b``: a.b if it is one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "inference"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "inference":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    ROOT / Path(*candidate.split("."))
                ).is_dir()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


def test_every_package_of_inference_has_a_layer():
    units = {unit_of(_module(p)) for p in _sources()} | {"api.gen"}
    assert units - set(RANK) == set(), "add these to the layers block of docs/architecture.md"
    assert set(RANK) - units == set(), "the layers block names packages that do not exist"


def test_imports_run_down_the_layers():
    upward = []
    for path in _sources():
        here = unit_of(_module(path))
        for line, target in _imports(path):
            there = unit_of(target)
            if there != here and RANK[there] <= RANK[here]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target} ({there})")
    assert upward == [], "imports up (or across) the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_only_the_api_and_its_clients_use_the_generated_stubs():
    users = {unit_of(_module(p)) for p in _sources() for _, t in _imports(p) if unit_of(t) == "api.gen"}
    assert users <= STUB_USERS, f"stubs imported by {sorted(users - STUB_USERS)}"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: an import of the api from io would be caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from inference.api.servicer import ReadingServicer\n")
    ((_, target),) = _imports(probe)
    assert (unit_of(target), RANK[unit_of(target)] < RANK["io"]) == ("api", True)


def _probes_on_backends(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        is_probe = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROBES
        if is_probe and node.args and "backend" in ast.unparse(node.args[0]).lower():
            lines.append(node.lineno)
    return lines


def test_no_capability_probes_on_backends():
    probes = [f"{p.relative_to(ROOT)}:{n}" for p in _sources() for n in _probes_on_backends(ast.parse(p.read_text()))]
    assert probes == [], "declare the capability on Backend (backends/base.py) instead of probing for it"
    assert _probes_on_backends(ast.parse("getattr(runner.backend, 'is_ready', None)")) == [1]


@pytest.mark.parametrize("method", ["is_ready", "release_cached_memory", "memory_allocated_bytes", "enable_compile"])
def test_backend_declares_the_capabilities_the_engine_uses(method):
    tree = ast.parse((PACKAGE / "backends" / "base.py").read_text())
    (backend,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Backend"]
    declared = {n.name for n in backend.body if isinstance(n, ast.FunctionDef)}
    assert {method, "can_fall_back_to_cpu", "forward_on_cpu", "compiled", "disable_compile", "close"} <= declared


def test_torch_cuda_only_in_backends_and_platform():
    used = []
    for path in _sources():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(CUDA_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.cuda"):
                used.append(f"{rel}:{node.lineno}")
    assert used == []


def test_modules_stay_small_or_say_why():
    large = []
    for path in _sources():
        lines = path.read_text().count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and SIZE_REASON not in docstring:
            large.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert large == [], f"split these, or write '{SIZE_REASON} <why>' in the module docstring"
