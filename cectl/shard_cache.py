"""Remote shards kept on this machine's disk, fetched once for every loader process here.

Each loader process reads every shard it takes a share of (see `cectl.data`): from S3
that would multiply the traffic by the number of processes. The cache sits in the
system's temp folder, in a folder private to the user, a file per shard named by its
manifest sha256; a shard enters it only once its bytes have that sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from cectl.errors import Failure
from cectl.storage import Store


class ShardCache:
    """Shards of a remote store, fetched once per machine into a folder that every loader
    process of this user here shares.

    Each loader process reads every shard it takes a share of (see the module docstring),
    about 16 times per shard with the defaults: from S3 that would be 16x the traffic. A
    shard is stored by its manifest sha256, so a rebuilt shard is never taken for the
    old one; it is fetched under a temporary name and published only if its bytes match,
    so a file of the cache is always the shard its name says (a hostile manifest cannot
    plant other bytes under a real shard's sha256). One lock file per shard keeps two
    processes from fetching it twice; beyond KEEP shards the oldest are dropped, unless a
    process holds their lock.
    """

    KEEP = 32  # 2-3 GB of ImageNet shards; loader processes work within a few of them

    def __init__(self, store: Store):
        self.store = store
        # One folder per user: another user's files are never read, nor theirs refused.
        self.folder = Path(tempfile.gettempdir(), f"cectl-shard-cache-{os.getuid()}")

    def open(self, shard: dict) -> BinaryIO:
        """The shard's bytes on this machine, fetched if no process here has yet."""
        self._make_private()
        local = self.folder / f"{shard['sha256']}.tar"
        with open(local.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if local.is_symlink() or not local.is_file():
                self._fetch(shard, local)
                self._drop_old()
            return open(local, "rb")  # open under the lock: dropping it later is harmless

    def _make_private(self) -> None:
        """Create the folder for this user alone; refuse one that others could have
        written to: a link, someone else's, or open to others."""
        with contextlib.suppress(FileExistsError):
            self.folder.mkdir(mode=0o700)
        info = self.folder.lstat()
        if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                or info.st_mode & 0o077):
            raise Failure(f"the shard cache {self.folder} is not a folder private to this user "
                          "(it is a link, another user's, or open to others): remove it, or "
                          "set TMPDIR to a folder of your own")

    def _fetch(self, shard: dict, local: Path) -> None:
        """Copy the shard to `local`, through a temporary name, if its sha256 matches."""
        part = local.with_suffix(".part")
        try:
            self.store.get_file(shard["name"], part)
            with open(part, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != shard["sha256"]:
                raise Failure(f"{self.store.url(shard['name'])} does not have the sha256 its "
                              "manifest gives: run `cectl verify` on the shards")
            os.replace(part, local)
        finally:
            part.unlink(missing_ok=True)

    def _drop_old(self) -> None:
        held = []
        for path in self.folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # another process dropped it
                held.append((path.stat().st_mtime, path))
        for _, old in sorted(held)[:-self.KEEP]:
            with contextlib.suppress(OSError), open(old.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: keep it
                old.unlink()
