"""Helpers for tests: the CLI in a subprocess, free ports, a flaky TCP proxy, odd images."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cectl(*args: str, env: dict | None = None, check: bool = False,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    result = subprocess.run([sys.executable, "-m", "cectl", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"cectl {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int = 2):
    """`cectl cluster local`: raylets on this machine; yields (address, its process id)."""
    proc = subprocess.Popen([sys.executable, "-m", "cectl", "cluster", "local", "--nodes",
                             str(nodes), "--cpus", str(cpus)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("RAY_ADDRESS="):
        proc.kill()
        raise AssertionError(f"cectl cluster local printed {line!r}")
    try:
        yield line.strip().split("=", 1)[1], proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextlib.contextmanager
def joined_nodes(address: str, count: int, cpus: int = 1):
    """`cectl cluster local --join`: `count` more nodes in the cluster at `address`, as
    machines coming back; they leave when the block ends."""
    proc = subprocess.Popen([sys.executable, "-m", "cectl", "cluster", "local", "--join",
                             address, "--nodes", str(count), "--cpus", str(cpus)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def kill_a_training_node(cluster_pid: int) -> None:
    """SIGKILL a node of a local cluster, as a preempted machine dies: the raylet and all
    it started at once. A node with a Ray Train worker, but not the head and not the one
    with the run's controller."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    procs = [(int(pid), int(ppid), args) for pid, ppid, args in
             (line.split(None, 2) for line in out.stdout.splitlines() if line.count(" ") >= 2)]
    # The head's raylet listens on sockets/raylet, the others on sockets/raylet.N.
    raylets = [pid for pid, ppid, args in procs
               if ppid == cluster_pid and "raylet/raylet" in args and "sockets/raylet." in args]
    for raylet in raylets:
        children = [(pid, args) for pid, ppid, args in procs if ppid == raylet]
        if (any("RayTrainWorker" in args for _, args in children)
                and not any("TrainController" in args for _, args in children)):
            for pid in (raylet, *(pid for pid, _ in children)):
                os.kill(pid, signal.SIGKILL)
            return
    raise AssertionError("no node of the cluster runs a Ray Train worker alone")


class FlakyProxy:
    """A TCP proxy to 127.0.0.1:`target` that can drop every connection for a while, or
    pass bytes at `rate` bytes/s, as a slow link does; it counts the bytes it passes.

    While dropping, new connections are reset at once and open ones are cut, as a
    flaky network or a restarting load balancer would do.
    """

    def __init__(self, target: int, rate: float | None = None):
        self.target, self.port, self.rate = target, free_port(), rate
        self.drop_until = 0.0
        self.dropped = 0
        self.passed = 0  # bytes, both ways
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop_for(self, seconds: float) -> None:
        self.drop_until = time.monotonic() + seconds
        with self._lock:
            for sock in list(self._open):
                self._reset(sock)

    def _reset(self, sock: socket.socket) -> None:
        self.dropped += 1
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # shutdown wakes a pump blocked in recv(); close alone would wait for it.
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        self._open.discard(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if time.monotonic() < self.drop_until:
                with self._lock:
                    self._reset(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
                with self._lock:
                    self.passed += len(data)
        except OSError:
            pass
        with self._lock:
            for sock in (src, dst):
                if sock in self._open:
                    self._open.discard(sock)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


# fp32: the same arithmetic on every test machine (`auto` is bf16 on CPUs with native bf16,
# which is slower than fp32 for networks this small).
TINY = ["model.width=8", "model.bottleneck=32", "data.image_size=32", "data.load_size=40",
        "data.batch_size=8", "data.workers=0", "mask.overlap=2", "train.log_every=1",
        "train.eval_every=1000", "train.checkpoint_every=1000", "train.precision=fp32"]


def tiny_job(data_uri: str, *overrides: str):
    """A job config small enough to train in a second or two on a CPU."""
    from cectl.config import load_config, validate_job
    from cectl.schema import JobConfig

    return validate_job(load_config(JobConfig, overrides=[*TINY, *overrides],
                                    flags={"data": {"uri": data_uri}}))
