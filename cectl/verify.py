"""`cectl verify`: re-read every shard of a manifest and check it against the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import math
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from rich.console import Console

from cectl.images import MAX_PIXELS, Skip, decode, open_image
from cectl.render import item_progress
from cectl.shard_format import IMAGE_KEYS, read_manifest, shard_names, tar_samples
from cectl.storage import Store, open_store


class _HashingReader:
    """Feeds the tar reader while hashing and counting every byte that passes."""

    def __init__(self, raw: IO[bytes], name: str):
        self.raw, self.name, self.sha, self.size = raw, name, hashlib.sha256(), 0

    def __repr__(self) -> str:
        return self.name  # webdataset names the stream in its errors

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(2**20):
            pass


class PixelBudget:
    """Decodes run together while their pixels fit the budget; a bigger one waits for the
    others and then runs alone. So verify's threads hold at most about one largest allowed
    image (100 MP, 300 MB as RGB) at a time, not one each."""

    def __init__(self, pixels: int):
        self.total = self.free = pixels
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self.free += pixels
                self._changed.notify_all()


_decodes = PixelBudget(MAX_PIXELS)


def _pixels(data: bytes) -> int:
    """The pixel count a file's header declares (0 if refused: decode() will say why)."""
    try:
        return math.prod(open_image(data).size)
    except Skip:
        return 0


def _sample_problem(sample: dict) -> str | None:
    """What is wrong with one sample read from a shard, if anything."""
    images = [ext for ext in IMAGE_KEYS if ext in sample]
    if not images or "json" not in sample:
        return f"sample {sample['__key__']} lacks an image or its .json"
    data = sample[images[0]]
    try:
        with _decodes.hold(_pixels(data)):
            decode(data)
    except Skip as e:
        return f"sample {sample['__key__']} does not decode ({e})"
    return None


def check_shard(store: Store, entry: dict) -> list[str]:
    """Problems found in one shard: missing, wrong hash or size, bad samples."""
    if not store.exists(entry["name"]):
        return ["missing"]
    problems, samples = [], 0
    with store.open(entry["name"]) as raw:
        reader = _HashingReader(raw, entry["name"])
        try:
            for sample in tar_samples(reader, entry["name"]):
                samples += 1
                if problem := _sample_problem(sample):
                    problems.append(problem)
        except (tarfile.TarError, ValueError) as e:  # ValueError: a file twice in one sample
            problems.append(f"unreadable tar ({e})")
        reader.drain()
    if reader.sha.hexdigest() != entry["sha256"]:
        problems.append("sha256 differs from the manifest")
    if reader.size != entry["bytes"]:
        problems.append(f"{reader.size} bytes, manifest says {entry['bytes']}")
    if samples != entry["samples"]:
        problems.append(f"{samples} samples, manifest says {entry['samples']}")
    return problems


def run_verify(dst_uri: str, console: Console, threads: int = 4) -> dict[str, list[str]]:
    """Check every shard; returns {shard name: problems} for the bad ones."""
    store = open_store(dst_uri)
    store.check()
    manifest = read_manifest(store)
    entries = [entry for _, entry in shard_names(manifest)]
    bad = {}
    with item_progress(console) as progress, ThreadPoolExecutor(threads) as pool:
        bar = progress.add_task("verifying", total=manifest["totals"]["samples"])
        for entry, problems in zip(entries, pool.map(lambda e: check_shard(store, e), entries),
                                   strict=True):
            progress.advance(bar, entry["samples"])
            if problems:
                bad[entry["name"]] = problems
    return bad
