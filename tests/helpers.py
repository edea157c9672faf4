"""Helpers for tests: the CLI in a subprocess and the check of its refusals, shard and
train builders, image bytes, free ports, a flaky TCP proxy, local Ray clusters."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Result(NamedTuple):
    """What a command line did, in-process (the `cli` fixture) as in a subprocess."""

    returncode: int
    stdout: str
    stderr: str


def assert_refused(refusal: Result | subprocess.CompletedProcess | Exception, code: int,
                   *names: str) -> str:
    """A refusal as users see it: exit `code` and one sentence that names each of `names`
    (the key, file, layer or option to fix). From a command line, the sentence is stderr's
    last line and its only error line, with no traceback; in-process, it is a CectlError's
    message. Returns the sentence."""
    if isinstance(refusal, Exception):
        message = str(refusal)
        assert getattr(refusal, "exit_code", None) == code, repr(refusal)
        assert len(message.splitlines()) == 1, message
    else:
        lines = refusal.stderr.strip().splitlines()
        assert refusal.returncode == code, refusal.stderr
        assert lines and lines[-1].startswith("error: "), refusal.stderr
        assert "Traceback" not in refusal.stderr, refusal.stderr
        assert sum(line.startswith("error:") for line in lines) == 1, refusal.stderr
        message = lines[-1]
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


def cectl(*args: str, env: dict | None = None, check: bool = False,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would (`python -m cectl`): for what
    only a process shows (the entry point, signals, kill -9); the `cli` fixture runs the
    rest in-process."""
    result = subprocess.run([sys.executable, "-m", "cectl", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"cectl {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def cectl_process(*args: str, setup: str = "", env: dict | None = None) -> subprocess.Popen:
    """The real CLI in a background process (output piped); `setup` is Python run first in
    it, to shorten a timeout that a test would otherwise wait out."""
    return subprocess.Popen(
        [sys.executable, "-c", f"{setup}\nfrom cectl.cli import main\nmain()", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})})


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until `condition()` holds; fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (FileNotFoundError, ValueError):
            pass  # not written yet, or being replaced
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}): "
                                 f"{process.stderr.read() if process.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError("timed out")


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


def descendants(root: int) -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process under `root`, from `ps`."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    procs = [(int(pid), int(ppid), args) for pid, ppid, args in
             (line.split(None, 2) for line in out.stdout.splitlines() if line.count(" ") >= 2)]
    found, parents = [], {root}
    while True:
        children = [p for p in procs if p[1] in parents and p not in found]
        if not children:
            return found
        found += children
        parents = {pid for pid, _, _ in children}


def train_workers(cluster_pid: int) -> list[int]:
    """The Ray Train workers of the local cluster `cluster_pid` (a test's own
    `cectl cluster local`): never those of another cluster on this machine."""
    return [pid for pid, _, args in descendants(cluster_pid) if "RayTrainWorker" in args]


def kill_a_training_node(cluster_pid: int) -> None:
    """SIGKILL a node of a local cluster, as a preempted machine dies: the raylet and all
    it started at once. A node with a Ray Train worker, but not the head and not the one
    with the run's controller."""
    procs = descendants(cluster_pid)
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


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """An image's file bytes in `fmt` (PNG, JPEG, TIFF, ...)."""
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def mask_png(hole: np.ndarray, mode: str = "L") -> bytes:
    """A mask image's PNG: white where `hole` (8-bit grey, RGBA, or 16-bit grey: "I;16")."""
    if mode == "I;16":
        return encode(Image.fromarray(hole.astype(np.uint16) * 65535))
    return encode(Image.fromarray(hole.astype(np.uint8) * 255, "L").convert(mode))


def image_bytes(size: tuple[int, int] = (40, 40), fmt: str = "PNG", colour=120,
                mode: str = "RGB") -> bytes:
    """The bytes of a plain image of one colour."""
    return encode(Image.new(mode, size, colour), fmt)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def shard_images(src: Path | str, dst: Path | str, **flags) -> dict:
    """`cectl shard SRC DST --FLAG VALUE...` in this process, quietly; the manifest."""
    from rich.console import Console

    from cectl.config import load_config
    from cectl.schema import ShardConfig
    from cectl.shard import run_shard

    cfg = load_config(ShardConfig, flags={"workers": 1, **flags})
    return run_shard(str(src), str(dst), cfg, Console(quiet=True))


def train_checkpoint(shards: str, store: Path, name: str, *overrides: str) -> str:
    """Train a tiny job (`tiny_job` with `overrides`) as run `name` in a local store; the
    path of its last checkpoint."""
    from cectl.runs import Run
    from cectl.storage import open_store
    from cectl.train import train

    train(tiny_job(shards, *overrides), open_store(str(store)), name)
    return Run(open_store(str(store)), name).checkpoint("latest").uri


def train_keys(shards: str) -> list[str]:
    """The keys of the train samples of a shard store, in manifest order."""
    from cectl.shard_format import open_manifest, read_samples
    from cectl.storage import open_store

    store, manifest = open_store(shards), open_manifest(shards)
    return [s["__key__"] for shard in manifest["splits"]["train"]["shards"]
            for s in read_samples(store, shard["name"])]


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


class HeaderStrippingProxy:
    """An HTTP/1.1 proxy to 127.0.0.1:`target` that drops one request header on the way (from
    every request, or from those of one `method`), as a server (or a gateway in front of
    it) that ignores that header would."""

    def __init__(self, target: int, header: str, method: str = ""):
        self.target, self.header = target, header.lower().encode() + b":"
        self.method = method.encode()
        self.port, self.stripped = free_port(), 0
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Each request's head without the header, then its body as it is."""
        stream = client.makefile("rb")
        with contextlib.suppress(OSError):
            while True:
                lines = []
                while (line := stream.readline()) not in (b"\r\n", b""):
                    lines.append(line)
                if not lines:
                    break
                kept = [line for line in lines if not line.lower().startswith(self.header)
                        or not lines[0].startswith(self.method)]
                self.stripped += len(lines) - len(kept)
                upstream.sendall(b"".join(kept) + b"\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in kept
                               if line.lower().startswith(b"content-length:")), 0)
                upstream.sendall(stream.read(length))
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _replies(self, upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                client.sendall(data)

    def close(self) -> None:
        self._server.close()
