"""Remote shards kept on this machine's disk, fetched once for every loader process here.

Each loader process reads every shard it takes a share of (see `cectl.data`): from S3
that would multiply the traffic by the number of processes. The cache sits in the
system's temp folder, a file per shard named by its manifest sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from pathlib import Path
from typing import BinaryIO

from cectl.storage import Store


class ShardCache:
    """Shards of a remote store, fetched once per machine into a folder that every loader
    process here shares.

    Each loader process reads every shard it takes a share of (see the module docstring),
    about 16 times per shard with the defaults: from S3 that would be 16x the traffic. A
    shard is stored by its manifest sha256, so a rebuilt shard is never taken for the
    old one; one lock file per shard keeps two processes from fetching it twice; beyond
    KEEP shards the oldest are dropped, unless a process holds their lock.
    """

    KEEP = 32  # 2-3 GB of ImageNet shards; loader processes work within a few of them

    def __init__(self, store: Store):
        self.store = store
        self.folder = Path(tempfile.gettempdir(), "cectl-shard-cache")

    def open(self, shard: dict) -> BinaryIO:
        """The shard's bytes on this machine, fetched if no process here has yet."""
        self.folder.mkdir(parents=True, exist_ok=True)
        local = self.folder / f"{shard['sha256']}.tar"
        with open(local.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not local.exists():
                self.store.get_file(shard["name"], local)
                self._drop_old()
            return open(local, "rb")  # open under the lock: dropping it later is harmless

    def _drop_old(self) -> None:
        held = []
        for path in self.folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # another process dropped it
                held.append((path.stat().st_mtime, path))
        for _, old in sorted(held)[:-self.KEEP]:
            with contextlib.suppress(OSError), open(old.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: keep it
                old.unlink()
