"""A local Orthanc with its DICOMweb plugin: the real archive of the bridge's tests, demo and benchmark.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide the server and the plugin. :class:`OrthancProcess`
starts one on a free loopback port with its own storage directory (DICOM networking off, no authentication), so
several run side by side; ``stop`` and ``start`` again keep the storage (an archive that goes away and comes back).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def orthanc_binary() -> str | None:
    """The Orthanc executable (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None


def orthanc_available() -> bool:
    return orthanc_binary() is not None and DICOMWEB_PLUGIN.exists()


class OrthancProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.users = dict(users or {})  # HTTP basic auth on every request when given
        self.port = port or free_port()
        self.log_path = log_path or self.workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        """The REST API's root."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "radserve-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "HttpBindAddress": "127.0.0.1",  # not every build honours it: RemoteAccessAllowed false as well
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout_s: float = 30.0) -> OrthancProcess:
        import requests

        binary = orthanc_binary()
        if binary is None or not DICOMWEB_PLUGIN.exists():
            raise RuntimeError("Orthanc with its DICOMweb plugin is not installed (apt: orthanc orthanc-dicomweb)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen([binary, str(self._config())], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode}; see {self.log_path}")
            try:
                if requests.get(f"{self.dicomweb_url}/studies", timeout=2, auth=self._auth()).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer within {timeout_s} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- Orthanc's REST API (not DICOMweb): how the tests and the demo put studies in --------------------------

    def upload(self, files: list[Path] | list[bytes]) -> None:
        """Store DICOM files through Orthanc's REST API (``POST /instances``), as a modality's gateway would."""
        import requests

        with requests.Session() as session:
            for item in files:
                data = item if isinstance(item, bytes) else Path(item).read_bytes()
                response = session.post(f"{self.url}/instances", data=data, timeout=60, auth=self._auth())
                response.raise_for_status()

    def study_id(self, study_uid: str) -> str:
        """Orthanc's own identifier of a study (its Explorer's URLs use it)."""
        import requests

        response = requests.post(f"{self.url}/tools/lookup", data=study_uid, timeout=60, auth=self._auth())
        response.raise_for_status()
        (study,) = [item for item in response.json() if item["Type"] == "Study"]
        return str(study["ID"])
