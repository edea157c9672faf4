"""Shards on this machine for its loader processes: an index of every shard, built once,
so that each process reads only the images of its own samples; remote shards fetched once.

Every loader process takes shares of many shards (see `cectl.data`). Reading whole shards,
each process would parse every shard it takes a share of, and from S3 fetch it. Instead
each shard gets an index here (each sample's key and where its image lies in the tar, from
the tar headers alone: `cectl.shard_format.index_tar`), and a process reads the images of
its samples at those offsets: over an epoch the machine parses each shard's headers once
and each image once. The folder is in the system's temp folder, private to the user. A
fetched shard is named by its manifest sha256 and enters the folder only once its bytes
have that sha256 (a hostile manifest cannot plant other bytes under a real shard's name);
a local shard's index is named by its sha256, path, size and time of change, so it never
serves another file. One lock file per shard keeps two processes from fetching or
indexing it twice; beyond KEEP shards the oldest copies and indexes are dropped, unless a
process holds their lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from cectl.errors import BadInput, Failure
from cectl.locks import beyond_newest, machine_lock
from cectl.shard_format import ImageEntry, index_tar, readable_shard
from cectl.storage import Store

INDEX = "index-1.json"  # the index file's suffix, with its format's version

def machine_folder() -> Path:
    """This machine's copies for this user (shards, their indexes, mask sets), in the
    system's temp folder. One folder per user: another user's files are never read, nor
    theirs refused."""
    return Path(tempfile.gettempdir(), f"cectl-shard-cache-{os.getuid()}")


def make_private(folder: Path) -> None:
    """Create `folder` for this user alone; refuse one that others could have written to:
    a link, someone else's, or open to others."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700, parents=False)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Failure(f"the shard cache {folder} is not a folder private to this user (it "
                      "is a link, another user's, or open to others): remove it, or set "
                      "TMPDIR to a folder of your own")


class ShardFile:
    """One shard open on this machine, with its index: images are read at their offsets."""

    def __init__(self, cache: ShardCache, shard: dict, path: Path, entries: list[ImageEntry]):
        self.cache, self.name, self.entries = cache, shard["name"], entries
        self.where = cache.store.url(shard["name"])
        self.fd = os.open(path, os.O_RDONLY)

    def image(self, entry: ImageEntry) -> bytes:
        data = os.pread(self.fd, entry.size, entry.offset)
        self.cache.bytes_read += len(data)
        if len(data) != entry.size:
            raise BadInput(f"shard {self.where} is shorter than its index says: run "
                           "`cectl verify`")
        return data

    def close(self) -> None:
        os.close(self.fd)


class ShardCache:
    """The indexes and local copies of shards, shared by the loader processes here; counts
    the bytes this process parses (`bytes_read`: tar headers, indexes and images)."""

    KEEP = 32  # 2-3 GB of ImageNet shards; loader processes work within a few of them

    def __init__(self, store: Store):
        self.store = store
        self.remote = store.local_path("") is None
        self.folder = machine_folder()
        self.bytes_read = 0

    def open(self, shard: dict) -> ShardFile:
        """The shard on this machine, indexed: fetched and indexed first if no process
        here has yet."""
        make_private(self.folder)
        stem = self.folder / self._stem(shard)
        index = stem.with_suffix(f".{INDEX}")
        path = stem.with_suffix(".tar") if self.remote else self.store.local_path(shard["name"])
        with machine_lock(stem.with_suffix(".lock")):
            if self.remote and (path.is_symlink() or not path.is_file()):
                self._fetch(shard, path)
            with readable_shard(self.store, shard["name"]):
                size = path.stat().st_size
            if size != shard["bytes"]:  # not the shard the index would be named after
                raise BadInput(f"shard {self.store.url(shard['name'])} is not the size its "
                               "manifest entry says: run `cectl verify`")
            if index.exists():
                text = index.read_bytes()
                self.bytes_read += len(text)
                entries = [ImageEntry(*entry) for entry in json.loads(text)]
            else:
                entries = self._index(shard["name"], path)
                partial = index.with_name(f".{index.name}.partial-{os.getpid()}")
                partial.write_text(json.dumps(entries))
                partial.replace(index)
                self._drop_old()
            # Opened under the lock: dropping the copy later does not take it away.
            return ShardFile(self, shard, path, entries)

    def _stem(self, shard: dict) -> str:
        """The name of a shard's files here: its sha256 for a fetched copy; for a shard read
        in place (not hashed), also its path, size and time of change."""
        if self.remote:
            return shard["sha256"]
        with readable_shard(self.store, shard["name"]):
            info = self.store.local_path(shard["name"]).stat()
        where = (shard["sha256"], self.store.url(shard["name"]), info.st_size, info.st_mtime_ns)
        return hashlib.sha256(repr(where).encode()).hexdigest()

    def _fetch(self, shard: dict, local: Path) -> None:
        """Copy the shard to `local`, through a temporary name, if its sha256 matches."""
        part = local.with_suffix(".part")
        for stale in part.parent.glob(f".{part.name}.partial-*"):  # a killed fetch's: the
            stale.unlink(missing_ok=True)  # shard's lock is held here, no fetch of it runs
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

    def _index(self, name: str, path: Path) -> list[ImageEntry]:
        with readable_shard(self.store, name), open(path, "rb", buffering=0) as raw:
            counted = _CountingReader(raw)
            entries = index_tar(counted, self.store, name)
        self.bytes_read += counted.count
        return entries

    def _drop_old(self) -> None:
        def lock_of(path: Path) -> Path:  # the stem's, the name up to its first dot
            return path.with_name(f"{path.name.split('.')[0]}.lock")

        for pattern in ("*.tar", f"*.{INDEX}"):
            for old in beyond_newest(self.folder, pattern, self.KEEP, lock_of):
                old.unlink(missing_ok=True)


class _CountingReader:
    """A file for `tarfile` that counts the bytes it hands over."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()
