"""One storage layer for local paths and `s3://bucket/prefix` URIs.

Keys are '/'-separated paths below the store's root. Every write is atomic: a partial
file or object is never visible under its final name (local files are renamed into
place; S3 objects only appear once their single PUT or multipart upload completes).
Names are checked here: a key never leaves its store's root ('..', absolute keys), a run
name is one safe path segment, and credentials in URLs are masked in messages. This
module holds the interface and the local store; `cectl.s3` the S3 one.

A few keys (a run's claim) are written by compare-and-swap: `read_versioned` gives a key's
bytes with a version, and `write_if` / `delete_if` act only while the key still holds the
version read, so of several processes racing for one key exactly one wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cectl.errors import BadInput
from cectl.locks import close_lock, open_lock

# Up to the last '@' of the address: a pasted secret may hold '/' or '@' (masking a path
# with an '@' too is the safe side).
USERINFO = re.compile(r"(?<=://)[^\s'\"]*@")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def mask_userinfo(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`, wherever it occurs in `text`."""
    return USERINFO.sub("***@", text)


def check_name(name: str, what: str) -> str:
    """A name that becomes one path segment (a run): safe characters only; returns it."""
    if not NAME.fullmatch(name):
        raise BadInput(f"{what} {name!r} is not allowed: use up to 100 letters, digits, '.', "
                       "'_' or '-', starting with a letter or digit")
    return name


def safe_key(key: str) -> bool:
    """Whether `key` stays below its store's root: relative, no '.' or '..' segments."""
    return not key.startswith("/") and not {".", ".."} & set(key.split("/"))


def checked_key(key: str) -> str:
    """`key`, or BadInput if it would leave the store's root."""
    if key and not safe_key(key):
        raise BadInput(f"refusing the storage key {key!r}: it leaves the store's folder")
    return key


def open_store(uri: str) -> Store:
    """The store for a local path or an `s3://bucket/prefix` URI."""
    if uri.startswith("s3://"):
        from cectl.s3 import S3Store

        return S3Store(uri)
    if "://" in uri:
        raise BadInput(f"unsupported storage URI {mask_userinfo(uri)!r}: use a local path or "
                       "s3://bucket/prefix")
    return LocalStore(uri)


class Store:
    """Interface shared by the local and S3 stores."""

    uri: str

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{checked_key(key)}" if key else self.uri

    def child(self, key: str) -> Store:
        return open_store(self.url(key))

    def check(self, create: bool = False) -> None:
        """Raise a clear CectlError when the store cannot be used."""

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def open(self, key: str) -> BinaryIO:
        """A streaming, buffered reader."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """`key`'s bytes and its version (which every write changes), or None if it is missing."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, version: str | None) -> str | None:
        """Write `key` atomically if it still holds `version` (None: if it does not exist);
        the new version, or None when refused (then nothing was written)."""
        raise NotImplementedError

    def delete_if(self, key: str, version: str) -> bool:
        """Delete `key` if it still holds `version`; whether this call deleted it."""
        raise NotImplementedError

    def check_conditional_writes(self) -> None:
        """Raise BadInput if `write_if` cannot be trusted here (an S3 server that ignores
        conditional requests)."""

    def clear_partial_writes(self, prefix: str = "") -> None:
        """Remove what interrupted writes below `prefix` left behind (partial files, pending
        multipart uploads). Only for the one process that writes there."""
        raise NotImplementedError

    def put_file(self, local_path: str | Path, key: str) -> None:
        """Copy a local file to `key` atomically (multipart on S3 for large files)."""
        raise NotImplementedError

    def write_file(self, key: str, write: Callable[[Path], None]) -> None:
        """Write `key` atomically through `write(path)`, which makes a local file: here, a
        temporary one that is then uploaded; on local disk, the key's own partial file."""
        with tempfile.TemporaryDirectory(prefix="cectl-") as folder:
            path = Path(folder, key.rsplit("/", 1)[-1])
            write(path)
            self.put_file(path, key)

    def get_file(self, key: str, local_path: str | Path) -> None:
        """Copy `key` to a local file, atomically."""
        checked_key(key)  # before any folder is made for it
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial_name(local_path)
        try:
            with self.open(key) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 4 * 2**20)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """All keys below `prefix`, recursively, sorted."""
        raise NotImplementedError

    def versions(self, prefix: str = "") -> dict[str, str]:
        """The keys below `prefix`, each with a tag that changes whenever its bytes do (a
        file's size and time of change; an S3 object's ETag)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def arrow_fs(self) -> tuple[object, str]:
        """A pyarrow filesystem and the root path in it (for Ray Train's storage)."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The file behind `key` when the store is on this machine's disk, else None."""
        return None


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_partial(key: str) -> bool:
    """Whether a key is a leftover of an interrupted local write."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".") and ".partial-" in name


LOCK_SUFFIX = ".cectl-lock"  # .NAME.cectl-lock: the lock of a local compare-and-swap of NAME


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStore(Store):
    def __init__(self, uri: str):
        self.root = Path(os.path.abspath(os.path.expanduser(uri)))
        self.uri = str(self.root)

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def path(self, key: str) -> Path:
        return self.root / checked_key(key) if key else self.root

    def check(self, create: bool = False) -> None:
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BadInput(f"cannot create {self.root}: {e.strerror}") from None
        elif not self.root.exists():
            raise BadInput(f"{self.root} does not exist")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def _atomic(self, key: str, write: Callable[[Path], None]) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial_name(final)
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda tmp: tmp.write_bytes(data))

    def write_file(self, key: str, write: Callable[[Path], None]) -> None:
        self._atomic(key, write)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, _version(data)

    def write_if(self, key: str, data: bytes, version: str | None) -> str | None:
        final = self.path(key)
        if version is None:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = _partial_name(final)
            try:
                tmp.write_bytes(data)
                os.link(tmp, final)  # fails if `final` exists; readers never see it half written
            except (FileExistsError, FileNotFoundError):  # taken (and maybe our partial file
                return None  # cleared by the winner)
            finally:
                tmp.unlink(missing_ok=True)
            return _version(data)
        try:
            with self._locked(final):
                current = self.read_versioned(key)
                if current is None or current[1] != version:
                    return None
                self.write_bytes(key, data)
        except FileNotFoundError:  # its folder is gone, and the key with it
            return None
        return _version(data)

    def delete_if(self, key: str, version: str) -> bool:
        path = self.path(key)
        try:
            with self._locked(path) as lock:
                current = self.read_versioned(key)
                if current is None or current[1] != version:
                    return False
                path.unlink()
                lock.unlink()  # with its key: whoever waits for it sees it gone, and retries
        except FileNotFoundError:
            return False
        self._remove_empty_folders(path)
        return True

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[Path]:
        """Hold `path`'s lock file exclusively, for a compare and a write that nothing may
        come between (every `write_if` and `delete_if` of an existing key takes it; a create
        needs none, the link is atomic). flock works across hosts on NFS too."""
        lock = path.with_name(f".{path.name}{LOCK_SUFFIX}")
        while True:
            fd = open_lock(lock, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                with contextlib.suppress(FileNotFoundError):
                    if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                        break  # still the file under that name: deleted ones lock nothing
            except BaseException:
                close_lock(fd)
                raise
            close_lock(fd)
        try:
            yield lock
        finally:
            close_lock(fd)

    def clear_partial_writes(self, prefix: str = "") -> None:
        for key in self.list(prefix):
            if is_partial(key):
                self.path(key).unlink(missing_ok=True)

    def put_file(self, local_path: str | Path, key: str) -> None:
        self._atomic(key, lambda tmp: shutil.copyfile(local_path, tmp))

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix)
        if base.is_file():
            return [prefix]
        keys, walked = [], set()
        # Into linked folders too (an ImageNet train/ linked from another disk), each real
        # folder once: a link to a folder above would go round for ever.
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            if (real := os.path.realpath(dirpath)) in walked:
                dirnames.clear()
                continue
            walked.add(real)
            rel = Path(dirpath).relative_to(self.root).as_posix()
            keys += [name if rel == "." else f"{rel}/{name}" for name in filenames
                     if not name.endswith(LOCK_SUFFIX)]
        return sorted(keys)

    def versions(self, prefix: str = "") -> dict[str, str]:
        stats = {key: self.path(key).stat() for key in self.list(prefix)}
        return {key: f"{info.st_size}-{info.st_mtime_ns}" for key, info in stats.items()}

    def delete(self, key: str) -> None:
        """Delete `key` and the folders it leaves empty (S3 has no empty folders either)."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        self._remove_empty_folders(path)

    def _remove_empty_folders(self, path: Path) -> None:
        for folder in path.parents:
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone)
                break

    def arrow_fs(self) -> tuple[object, str]:
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem(), str(self.root)
