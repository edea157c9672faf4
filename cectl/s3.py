"""The S3 store: `s3://bucket/prefix` through boto3, for AWS or any S3-compatible server.

S3 settings come from the standard AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
boto3's managed transfer does the uploads and botocore's retry policy the retries; cectl
adds only the atomic names, the reopening reader and one-sentence errors.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from cectl.errors import BadInput, Failure
from cectl.storage import Store, checked_key, mask_userinfo

MULTIPART_THRESHOLD = 64 * 2**20
PART_SIZE = 32 * 2**20
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                  "RequestLimitExceeded", "TooManyRequestsException", "InternalError"}


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
        key = checked_key(key)
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
