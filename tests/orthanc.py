"""A throwaway Orthanc (Debian's package, with its DICOMweb plugin) for tests: its own config, storage and free
port, started as our child process, waited for by polling with a deadline, stopped by PID.

Orthanc 1.10 cannot bind one address: it listens on all interfaces, and RemoteAccessAllowed=false makes it answer
only 127.0.0.1. Its DICOM (DIMSE) server is off; the tests speak DICOMweb only.
"""

from __future__ import annotations

import glob
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*")


def find_orthanc() -> tuple[str, str] | None:
    """(Orthanc binary, DICOMweb plugin) when both are installed, else None."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    plugins = [p for pattern in PLUGIN_GLOBS for p in sorted(glob.glob(pattern))]
    return (binary, plugins[0]) if binary and plugins else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    def __init__(self, binary: str, plugin: str):
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="fedmed-orthanc-"))
        self.port = _free_port()
        self.config = self.root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "fedmed-test-pacs",
                    "StorageDirectory": str(self.root / "db"),
                    "IndexDirectory": str(self.root / "db"),
                    "HttpPort": self.port,
                    "DicomServerEnabled": False,
                    "DicomPort": _free_port(),
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [plugin],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "StableAge": 1,
                }
            )
        )
        self.process: subprocess.Popen | None = None

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.rest_url}/dicom-web"

    def _log_tail(self) -> str:
        log = self.root / "orthanc.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def start(self, timeout: float = 60) -> None:
        log = open(self.root / "orthanc.log", "wb")
        self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                if requests.get(f"{self.dicomweb_url}/studies", timeout=2).status_code == 200:
                    return
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.1)  # polling the server with a deadline, not waiting blindly
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout}s:\n{self._log_tail()}")

    def upload(self, path: Path) -> None:
        """Store one DICOM file through Orthanc's own REST API (as a modality would send it)."""
        r = requests.post(f"{self.rest_url}/instances", data=Path(path).read_bytes(), timeout=30)
        r.raise_for_status()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
