"""`radserve triton serve`: a local Triton Inference Server on the models of a radserve repository.

The server is the ``tritonserver`` binary of the nvidia-pytriton wheel (Triton 2.51, Python backend only),
installed in its own virtual environment (:func:`ensure_environment`; nvidia-pytriton needs numpy < 2, radserve
numpy 2). The repository is exported with the ``python`` runtime (:mod:`inference.triton.python_model` running
the TorchScript export with that environment's CPU torch) into a cache directory keyed by a fingerprint of
the models' files, so a restart serves the same export at once. Triton's own dynamic batcher batches the
requests of every radserve replica.

Running the binary outside PyTriton needs what PyTriton's launcher does: the Python-backend stub of the
environment's Python version next to ``libtriton_python.so`` (:func:`backends_directory`), the wheel's bundled
libraries and the system libpython on ``LD_LIBRARY_PATH`` (the stub links the system libpython; without it the
stub fails with "'_thread.RLock' object has no attribute '_recursion_count'"), and the environment's
``bin`` and ``site-packages`` on ``PATH`` / ``PYTHONPATH`` so that ``model.py`` imports torch and numpy from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "TritonEnvironment",
    "TritonServerProcess",
    "cached_export",
    "default_venv",
    "ensure_environment",
    "serve",
]

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
MARKER = ".radserve-installed"  # holds the sha256 of the requirements the environment was built from
ENV_VENV = "RADSERVE_TRITON_VENV"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "radserve"


def default_venv() -> Path:
    """``$RADSERVE_TRITON_VENV``, else ``.venv-triton`` in a source checkout, else ``~/.cache/radserve/venv-triton``."""
    if os.environ.get(ENV_VENV):
        return Path(os.environ[ENV_VENV])
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and os.access(root, os.W_OK):
        return root / ".venv-triton"
    return _cache_home() / "venv-triton"


def _requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


@dataclass(frozen=True)
class TritonEnvironment:
    venv: Path
    python_version: str  # "3.11": picks the Python-backend stub
    libdir: Path  # the directory of the system libpython the stub links
    site_packages: Path
    pytriton: Path  # the pytriton package directory

    @property
    def server_binary(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    @property
    def bundled_libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    def backends_directory(self) -> Path:
        """Triton's backend directory: the wheel's Python backend plus the stub for this Python (made once)."""
        target = self.venv / "radserve-backends"
        stub = (
            self.pytriton / "tritonserver" / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"
        )
        if not stub.is_file():
            raise RuntimeError(
                f"nvidia-pytriton in {self.venv} has no Python-backend stub for Python {self.python_version}"
            )
        if not (target / "python" / "triton_python_backend_stub").is_file():
            staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=self.venv))
            shutil.copytree(self.pytriton / "tritonserver" / "backends" / "python", staging / "python")
            shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        return target

    def process_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        libs = [str(self.libdir), str(self.bundled_libs)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONPATH"] = str(self.site_packages)
        env["PYTHONNOUSERSITE"] = "1"
        env.pop("PYTHONHOME", None)
        return env


_PROBE = """
import importlib.util, json, sys, sysconfig, site
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "site": site.getsitepackages()[0],
    "pytriton": list(spec.submodule_search_locations)[0] if spec else None,
}))
"""


def _inspect(venv: Path) -> TritonEnvironment:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    info = json.loads(out.stdout)
    if not info["pytriton"]:
        raise RuntimeError(f"{venv} has no nvidia-pytriton; remove it and run `make venv-triton`")
    return TritonEnvironment(
        venv=venv,
        python_version=info["version"],
        libdir=Path(info["libdir"]),
        site_packages=Path(info["site"]),
        pytriton=Path(info["pytriton"]),
    )


def ensure_environment(
    venv: Path | None = None, *, create: bool = True, python: str | None = None
) -> TritonEnvironment:
    """The Triton virtual environment at ``venv`` (default :func:`default_venv`), created or updated from
    ``inference/triton/requirements.txt`` when missing or stale and ``create`` is true (a few minutes: pip
    installs nvidia-pytriton and a CPU torch). Raises RuntimeError saying what failed."""
    venv = Path(venv or default_venv()).absolute()
    digest = _requirements_digest()
    marker = venv / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return _inspect(venv)
    if not create:
        raise RuntimeError(f"no Triton environment at {venv}; run `make venv-triton`")
    venv.mkdir(parents=True, exist_ok=True)
    (venv / ".gitignore").write_text("*\n")  # Python < 3.13 venvs do not ignore themselves
    with open(venv / ".radserve-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one creator at a time (make and a test may race)
        if marker.is_file() and marker.read_text().strip() == digest:
            return _inspect(venv)
        start = time.monotonic()
        logger.info("creating the Triton environment %s from %s (a few minutes)", venv, REQUIREMENTS)
        base = python or getattr(sys, "_base_executable", None) or sys.executable
        steps = []
        if not (venv / "bin" / "python").exists():  # `python -m venv` takes the existing, empty directory
            steps.append([base, "-m", "venv", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        steps.append([*pip, "-r", str(REQUIREMENTS)])
        for cmd in steps:
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
                raise RuntimeError(f"creating the Triton environment failed: {' '.join(cmd)}\n{tail}")
        marker.write_text(digest + "\n")
        logger.info("Triton environment %s ready in %.0f s", venv, time.monotonic() - start)
    return _inspect(venv)


def cached_export(models: Path, *, cache_dir: Path | None = None, only: Sequence[str] = ()) -> Path:
    """A Triton repository (python runtime, CPU instances) of ``models``, exported once per fingerprint."""
    from inference.triton.export import export_repository, repository_fingerprint

    options = {"runtime": "python", "instance_kind": "cpu", "only": sorted(only)}
    root = Path(cache_dir or _cache_home() / "triton-repositories")
    target = root / repository_fingerprint(models, **options)
    if (target / "radserve-export.json").is_file():
        logger.info("using the cached Triton export %s", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        export_repository(models, staging, runtime="python", instance_kind="cpu", only=only)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same export first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies, so that a killed `radserve triton serve` leaves no server."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TritonServerProcess:
    """One ``tritonserver`` child process serving ``repository``."""

    def __init__(
        self,
        environment: TritonEnvironment,
        repository: Path,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        models: Sequence[str] = (),
        log_verbose: int = 0,
    ) -> None:
        self.environment = environment
        self.repository = Path(repository)
        self.host = host
        self.grpc_port = grpc_port
        # Python-backend shared-memory regions of this server: /dev/shm/<prefix>*; a killed server leaves them.
        self.shm_prefix = f"radserve_triton_{grpc_port}_"
        args = [
            str(environment.server_binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={environment.backends_directory()}",
            f"--cache-directory={environment.pytriton / 'tritonserver' / 'caches'}",
            f"--grpc-address={host}",
            f"--grpc-port={grpc_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=30",
        ]
        args += [f"--http-address={host}", f"--http-port={http_port}"] if http_port else ["--allow-http=false"]
        if metrics_port:
            args += [
                "--allow-metrics=true",
                "--allow-gpu-metrics=false",
                f"--metrics-address={host}",
                f"--metrics-port={metrics_port}",
            ]
        else:
            args += ["--allow-metrics=false"]
        if models:
            args += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def remove_stale_shared_memory(self) -> None:
        for path in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def spawn(self, *, stdout: int | object | None = None) -> TritonServerProcess:
        self.remove_stale_shared_memory()
        self.process = subprocess.Popen(
            self.args,
            env=self.environment.process_env(),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            preexec_fn=_die_with_parent,
        )
        logger.info(
            "started tritonserver (pid %d) on grpc %s, repository %s", self.process.pid, self.url, self.repository
        )
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> list[str]:
        """Block until Triton says ready; returns the names of the ready models. Raises on exit or time-out."""
        from tritonclient.utils import InferenceServerException

        from inference.backends.triton.client import connect

        deadline = time.monotonic() + timeout_s
        client = connect(self.url)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with code {self.process.returncode} during start-up")
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        index = client.get_model_repository_index(as_json=True, client_timeout=5.0)
                        return sorted(m["name"] for m in index.get("models", []) if m.get("state") == "READY")
                except InferenceServerException:
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        raise TimeoutError(f"Triton at {self.url} not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (Triton finishes the requests in flight), then SIGKILL after ``timeout_s``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.remove_stale_shared_memory()
        return self.process.returncode


def serve(
    models: Path,
    *,
    repository: Path | None = None,
    host: str = "127.0.0.1",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    only: Sequence[str] = (),
    venv: Path | None = None,
    cache_dir: Path | None = None,
) -> int:
    """Export (cached) and serve until SIGTERM/SIGINT, which is forwarded to Triton; returns Triton's exit code
    (0 after a forwarded signal)."""
    environment = ensure_environment(venv)
    repository = Path(repository) if repository else cached_export(models, cache_dir=cache_dir, only=only)
    server = TritonServerProcess(
        environment,
        repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        models=only,
    )
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if server.process is not None and server.process.poll() is None:
            logger.info("forwarding %s to tritonserver (pid %d)", signal.Signals(signum).name, server.process.pid)
            server.process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.spawn()
        try:
            ready = server.wait_ready()
        except TimeoutError as exc:
            logger.error("%s; stopping it", exc)
            server.stop()
            return 1
        except RuntimeError as exc:
            logger.error("%s", exc)
            return server.process.returncode or 1
        logger.info(
            "Triton Inference Server serving %s on grpc %s (http %s, metrics %s), repository %s",
            ", ".join(ready) or "no models",
            server.url,
            http_port or "off",
            metrics_port or "off",
            repository,
        )
        code = server.process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.remove_stale_shared_memory()
    logger.info("tritonserver exited with code %d", code)
    return 0 if received and code in (0, -signal.SIGTERM, -signal.SIGINT) else code
