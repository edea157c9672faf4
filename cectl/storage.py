"""One storage layer for local paths and `s3://bucket/prefix` URIs.

Keys are '/'-separated paths below the store's root. Every write is atomic: a partial
file or object is never visible under its final name (local files are renamed into
place; S3 objects only appear once their single PUT or multipart upload completes).
S3 settings come from the standard AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
Names are checked here: a key never leaves its store's root ('..', absolute keys), a run
name is one safe path segment, and credentials in URLs are masked in messages.
On S3, boto3's managed transfer does the uploads and botocore's retry policy the retries;
cectl adds only the atomic names, the reopening reader and one-sentence errors.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from cectl.errors import BadInput, Failure

MULTIPART_THRESHOLD = 64 * 2**20
PART_SIZE = 32 * 2**20
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                  "RequestLimitExceeded", "TooManyRequestsException", "InternalError"}


USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
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


def _checked(key: str) -> str:
    if key and not safe_key(key):
        raise BadInput(f"refusing the storage key {key!r}: it leaves the store's folder")
    return key


def open_store(uri: str) -> Store:
    """The store for a local path or an `s3://bucket/prefix` URI."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri:
        raise BadInput(f"unsupported storage URI {mask_userinfo(uri)!r}: use a local path or "
                       "s3://bucket/prefix")
    return LocalStore(uri)


class Store:
    """Interface shared by the local and S3 stores."""

    uri: str

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{_checked(key)}" if key else self.uri

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

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist, atomically; whether this call created it."""
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


class LocalStore(Store):
    def __init__(self, uri: str):
        self.root = Path(os.path.abspath(os.path.expanduser(uri)))
        self.uri = str(self.root)

    def local_path(self, key: str) -> Path:
        return self.path(key)

    def path(self, key: str) -> Path:
        return self.root / _checked(key) if key else self.root

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

    def create(self, key: str, data: bytes) -> bool:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial_name(final)
        try:
            tmp.write_bytes(data)
            os.link(tmp, final)  # fails if `final` exists; readers never see it half written
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local_path: str | Path, key: str) -> None:
        self._atomic(key, lambda tmp: shutil.copyfile(local_path, tmp))

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix)
        if base.is_file():
            return [prefix]
        keys = []
        for dirpath, _, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            keys += [name if rel == "." else f"{rel}/{name}" for name in filenames]
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete `key` and the folders it leaves empty (S3 has no empty folders either)."""
        path = self.path(key)
        path.unlink(missing_ok=True)
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


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Config:
    """The one S3 client configuration, for cectl's boto3 client and Ray's pyarrow filesystem."""

    endpoint: str | None
    region: str
    # Total attempts per request, as AWS_MAX_ATTEMPTS counts them. botocore's standard mode
    # backs off with jitter from 50 ms (1 s when throttled), doubling up to 20 s: ten
    # attempts ride out some 13 s (at most 25 s) of lost connection.
    max_attempts: int = 10
    connect_timeout: float = 3.0
    read_timeout: float = 30.0

    @classmethod
    def from_environment(cls) -> S3Config:
        """Endpoint, region and attempts from the standard AWS chain."""
        import botocore.session

        chain = botocore.session.get_session()
        return cls(endpoint=endpoint_url(),
                   region=chain.get_config_variable("region") or "us-east-1",
                   max_attempts=chain.get_config_variable("max_attempts") or cls.max_attempts)

    def boto_client(self):
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            s3={"addressing_style": "path"} if self.endpoint else {},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)

    def arrow_filesystem(self):
        import pyarrow.fs

        endpoint = {}
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            endpoint = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
        return pyarrow.fs.S3FileSystem(
            region=self.region,
            connect_timeout=self.connect_timeout,
            request_timeout=self.read_timeout,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
            **endpoint,
        )


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=PART_SIZE)


def _transient(e: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or e.response.get("Error", {}).get("Code") in THROTTLE_CODES
    return isinstance(e, HTTPClientError | BotoConnectionError | ResponseStreamingError
                      | IncompleteReadError | ConnectionError | TimeoutError)


_clients: dict[int, object] = {}


class S3Store(Store):
    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise BadInput(f"S3 URI {uri!r} has no bucket: use s3://bucket/prefix")
        if "@" in parsed.netloc:
            raise BadInput(f"S3 URI {mask_userinfo(uri)!r} holds credentials: use "
                           "s3://bucket/prefix and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        key = _checked(key)
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key

    @property
    def client(self):
        # One client per process: boto3 clients are thread-safe but must not cross a fork.
        pid = os.getpid()
        if pid not in _clients:
            _clients[pid] = S3Config.from_environment().boto_client()
        return _clients[pid]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Raise S3 failures as one-sentence CectlErrors, once botocore has retried them."""
        try:
            yield
        except Exception as e:
            error = self._explain(e)
            if error is e:
                raise
            raise error from None

    def _explain(self, e: Exception) -> Exception:
        """Turn a boto error into a one-sentence CectlError; leave others alone."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = mask_userinfo(endpoint_url() or "AWS S3")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return BadInput("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchBucket",) or (status == 404 and code in ("404", "NotFound", "")):
                return BadInput(f"bucket {self.bucket!r} does not exist at {where}: "
                                "create it or fix the URI")
            if code in ("NoSuchKey",):
                return BadInput(f"an object is missing in s3://{self.bucket}/{self.prefix}")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                        "InvalidToken", "ExpiredToken", "403", "Forbidden"):
                return BadInput(f"access to s3://{self.bucket} denied ({code}): check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile")
            return Failure(f"S3 request to {where} failed: {code or status}")
        if _transient(e):
            return Failure(f"cannot reach S3 at {where} ({type(e).__name__}): check "
                           "AWS_ENDPOINT_URL and the network")
        return e

    def check(self, create: bool = False) -> None:
        with self._errors():
            self.client.head_bucket(Bucket=self.bucket)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_S3Reader(self, self._key(key)), buffer_size=2**20)

    def _upload(self, fileobj: BinaryIO, key: str) -> None:
        # One PUT below the threshold, a multipart upload above it (aborted if it fails):
        # either way the object appears under its name only once it is whole.
        with self._errors():
            self.client.upload_fileobj(fileobj, self.bucket, self._key(key),
                                       Config=_transfer_config())

    def write_bytes(self, key: str, data: bytes) -> None:
        self._upload(io.BytesIO(data), key)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:  # a conditional PUT: S3 refuses it (412) when the key exists
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       IfNoneMatch="*")
                return True
            except ClientError as e:
                # 409: a concurrent conditional PUT of the same key is in flight
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False
                raise

    def put_file(self, local_path: str | Path, key: str) -> None:
        with open(local_path, "rb") as f:
            self._upload(f, key)

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        with self._errors():
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                found += [obj["Key"][len(root):] for obj in page.get("Contents", [])]
        return sorted(found)

    def delete(self, key: str) -> None:
        with self._errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def arrow_fs(self) -> tuple[object, str]:
        fs = S3Config.from_environment().arrow_filesystem()
        return fs, f"{self.bucket}/{self.prefix}".rstrip("/")


class _S3Reader(io.RawIOBase):
    """A GET body that reopens at its current offset (a Range GET) when the connection drops."""

    REOPENS = 5  # drops in a row, each after a successful reopen, before a read gives up

    def __init__(self, store: S3Store, full_key: str):
        self._store, self._key, self._pos, self._body = store, full_key, 0, None

    def readable(self) -> bool:
        return True

    def _open_body(self):
        """The body from the current offset on; None when the offset is the end."""
        from botocore.exceptions import ClientError

        if self._body is None:
            extra = {"Range": f"bytes={self._pos}-"} if self._pos else {}
            with self._store._errors():
                try:
                    response = self._store.client.get_object(
                        Bucket=self._store.bucket, Key=self._key, **extra)
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") == "InvalidRange":
                        return None  # the drop happened exactly at the end
                    raise
            self._body = response["Body"]
        return self._body

    def readinto(self, buffer) -> int:
        for drop in range(self.REOPENS + 1):
            body = self._open_body()
            if body is None:
                return 0
            try:
                data = body.read(len(buffer))
                break
            except Exception as e:
                self._body = None
                if not _transient(e) or drop == self.REOPENS:
                    raise self._store._explain(e) from None
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()
