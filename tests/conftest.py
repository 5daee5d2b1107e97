"""Shared test set-up: the `cuda` marker skips without a GPU; one real server per module that asks; model repositories
holding one bundled model, for modules that start their own server.

Test tiers: a test that starts a server (radserve in this process or a child, a benchmark run, Triton, an Orthanc
archive) carries the `server` marker; `make test-unit` runs the others (``-m "not server and not slow"``). A test
using a server fixture (named ``server``, ``*_server``, ``orthanc`` or ``triton``, directly or through another
fixture) is marked at collection; any other is marked in its module. The guard below fails a test that starts a
server without the marker, so the unit tier stays free of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from server_guard import starts_a_server

ROOT = Path(__file__).resolve().parents[1]
SERVER_FIXTURES = ("server", "orthanc", "triton")  # and any fixture named *_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(name in SERVER_FIXTURES or name.endswith("_server") for name in names):
            item.add_marker(pytest.mark.server)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# -- the guard: a server started by a test without the `server` marker fails it --------------------------------------

_running: list[pytest.Item] = []


def _check_marked(what: str) -> None:
    if _running and "server" not in _running[-1].keywords:
        pytest.fail(f"{_running[-1].nodeid} starts {what} without the `server` marker (tests/conftest.py)", False)


_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
    if starts_a_server(args):  # type: ignore[arg-type]
        _check_marked(f"a server process ({' '.join(map(str, args))[:120]})")  # type: ignore[call-overload]
    _popen_init(self, args, *rest, **kwargs)  # type: ignore[arg-type]


subprocess.Popen.__init__ = _guarded_popen_init  # type: ignore[method-assign]


def _guard_in_process_server(module: ModuleType) -> None:
    """radserve's server started in this process counts too (RadserveServer.start)."""
    start = module.RadserveServer.start

    async def guarded_start(self: object) -> int:
        _check_marked("radserve's server in this process")
        return await start(self)

    module.RadserveServer.start = guarded_start


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Applies :func:`_guard_in_process_server` when inference.api.server is first imported, so that a session that
    never imports the server does not pay for it."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "inference.api.server":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_guard(module: ModuleType) -> None:
            exec_module(module)
            _guard_in_process_server(module)

        spec.loader.exec_module = exec_and_guard  # type: ignore[method-assign]
        return spec


if "inference.api.server" in sys.modules:
    _guard_in_process_server(sys.modules["inference.api.server"])
else:
    sys.meta_path.insert(0, _GuardOnImport())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The real server, with the bundled models on the CPU, on a free loopback port."""
    from inference.serverproc import ServerProcess

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(models=ROOT / "models", device="cpu", log_path=log_path, extra_args=["--log-level", "DEBUG"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``model_repo(name)``: a new model repository holding only the bundled model ``name``.

    A server on it warms up one model rather than every bundled one, keeps answering "no model reads this modality"
    for the others when models are added to models/, and does not see models/ change while it runs: the model's
    files are copied (its training script and caches left out).
    """

    def make(name: str) -> Path:
        repo = tmp_path_factory.mktemp("models")
        shutil.copytree(ROOT / "models" / name, repo / name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        return repo

    return make


@pytest.fixture(scope="session")
def sr_finding_groups() -> Callable:
    """``sr_finding_groups(sr)``: a radserve SR's measurement groups per finding, read with highdicom.

    A list in finding order (tracking identifier "finding N"), each a dict of the finding's groups by role:
    "outline" and "center" (TID 1410, told apart by their geometric purpose), "center_3d" (TID 1411 volume surface)
    and "segment" (TID 1411 referenced segment); a role the report lacks is absent.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def purpose(group) -> str | None:
        for item in group[0].ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue == "130400":
                return str(item.ConceptCodeSequence[0].CodeValue)
        return None

    def read(sr: hd.sr.Comprehensive3DSR) -> list[dict]:
        found: dict[int, dict] = {}
        for group in sr.content.get_planar_roi_measurement_groups():
            role = "outline" if purpose(group) == codes.DCM.Outline.value else "center"
            number = int(group.tracking_identifier.removeprefix("finding "))
            assert role not in found.setdefault(number, {}), f"two {role} groups for finding {number}"
            found[number][role] = group
        for group in sr.content.get_volumetric_roi_measurement_groups():
            role = "segment" if group.reference_type == codes.DCM.ReferencedSegment else "center_3d"
            number = int(group.tracking_identifier.removeprefix("finding "))
            assert role not in found.setdefault(number, {}), f"two {role} groups for finding {number}"
            found[number][role] = group
        assert sorted(found) == list(range(1, len(found) + 1)), sorted(found)
        return [found[number] for number in sorted(found)]

    return read
