"""The S3 store: `s3://bucket/prefix` through boto3, for AWS or any S3-compatible server.

S3 settings come from the standard AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...);
`cectl.s3_client` makes the client and retries each request. Here: atomic uploads (one
PUT, or a multipart upload that is aborted when it fails), a reader that reopens dropped
connections, and the compare-and-swap of a run's claim as conditional requests.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlparse

from cectl.errors import BadInput
from cectl.s3_client import S3Config, client_for, code, explain, request, status, transient
from cectl.storage import Store, checked_key, mask_userinfo

BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule for new buckets
MULTIPART_THRESHOLD = 64 * 2**20
PART_SIZE = 32 * 2**20
PARALLEL_PARTS = 8
REFUSED = (409, 412)  # a condition not met, or a conflicting conditional request in flight
T = TypeVar("T")

_conditions_checked: set[tuple[str | None, str]] = set()  # (endpoint, bucket), per process


class S3Store(Store):
    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise BadInput(f"S3 URI {uri!r} has no bucket: use s3://bucket/prefix")
        # A bucket name holds no '@' nor ':'; a secret with a '/' ends the address early.
        if "@" in parsed.netloc or ":" in parsed.netloc:
            raise BadInput(f"S3 URI {mask_userinfo(uri)!r} holds credentials: use "
                           "s3://bucket/prefix and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if not BUCKET.fullmatch(parsed.netloc):
            raise BadInput(f"S3 URI {mask_userinfo(uri)!r}: {parsed.netloc!r} is not a bucket "
                           "name (3-63 lowercase letters, digits, '.' and '-')")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._config: S3Config | None = None

    def _key(self, key: str) -> str:
        key = checked_key(key)
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key

    def _below(self, prefix: str) -> tuple[str, Callable[[str], bool]]:
        """The full-key prefix to ask S3 for the keys below `prefix`, and the test its
        answers must pass: as on local disk, `prefix` names a key or a folder, so that the
        run `a` never lists the run `ab`, nor `checkpoints/step-1000/` the step 10000."""
        full = self._key(prefix)
        if not prefix.strip("/"):  # the store's own folder
            return (f"{full}/" if full else ""), lambda key: True
        return full, lambda key: key == full or key.startswith(f"{full}/")

    @property
    def config(self) -> S3Config:
        if self._config is None:
            self._config = S3Config.from_environment()
        return self._config

    @property
    def client(self):
        return client_for(self.config)

    def _request(self, call: Callable[[], T], stop: threading.Event | None = None) -> T:
        return request(self.config, call, stop)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Raise S3 failures as one-sentence CectlErrors."""
        try:
            yield
        except Exception as e:
            error = self._explain(e)
            if error is e:
                raise
            raise error from None

    def _explain(self, e: Exception) -> Exception:
        return explain(e, self.config, self.bucket, self.prefix)

    def check(self, create: bool = False) -> None:
        with self._errors():
            self._request(lambda: self.client.head_bucket(Bucket=self.bucket))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self._request(lambda: self.client.head_object(Bucket=self.bucket,
                                                              Key=self._key(key)))
                return True
            except ClientError as e:
                if status(e) == 404:
                    return False
                raise

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_S3Reader(self, self._key(key)), buffer_size=2**20)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors():
            self._request(lambda: self.client.put_object(Bucket=self.bucket,
                                                         Key=self._key(key), Body=data))

    def put_file(self, local_path: str | Path, key: str) -> None:
        # One PUT up to the threshold, a multipart upload above it: either way the object
        # appears under its name only once it is whole.
        if os.path.getsize(local_path) <= MULTIPART_THRESHOLD:
            self.write_bytes(key, Path(local_path).read_bytes())
            return
        with self._errors():
            self._put_parts(Path(local_path), self._key(key))

    def _put_parts(self, path: Path, full_key: str) -> None:
        """A multipart upload of `path`, PARALLEL_PARTS parts at a time, each retried on its
        own; aborted if it fails (its parts would stay on the server, billed and unlisted)."""
        where = {"Bucket": self.bucket, "Key": full_key}
        upload = self._request(lambda: self.client.create_multipart_upload(
            **where, ChecksumAlgorithm="CRC32"))["UploadId"]
        failed = threading.Event()

        def send(number: int) -> dict:
            with open(path, "rb") as f:
                f.seek((number - 1) * PART_SIZE)
                body = f.read(PART_SIZE)
            sent = self._request(lambda: self.client.upload_part(
                **where, UploadId=upload, PartNumber=number, Body=body,
                ChecksumAlgorithm="CRC32"), stop=failed)
            return {"PartNumber": number, "ETag": sent["ETag"],
                    **{k: v for k, v in sent.items() if k == "ChecksumCRC32"}}

        pool = ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="s3-part")
        try:
            parts = list(pool.map(send, range(1, -(-path.stat().st_size // PART_SIZE) + 1)))
            self._request(lambda: self.client.complete_multipart_upload(
                **where, UploadId=upload, MultipartUpload={"Parts": parts}))
        except BaseException:
            failed.set()
            pool.shutdown(cancel_futures=True)  # the parts in flight end before the abort
            # One try: when the server is out of reach, the next claim of the run clears it.
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(**where, UploadId=upload)
            raise
        finally:
            pool.shutdown()

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        def get() -> tuple[bytes, str]:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return reply["Body"].read(), reply["ETag"]

        with self._errors():
            try:
                return self._request(get)
            except ClientError as e:
                if code(e) == "NoSuchKey":
                    return None
                raise

    def write_if(self, key: str, data: bytes, version: str | None) -> str | None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        with self._errors():
            try:
                return self._request(lambda: self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, **condition))["ETag"]
            except ClientError as e:
                if status(e) in REFUSED or code(e) == "NoSuchKey":
                    return None
                raise

    def delete_if(self, key: str, version: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self._request(lambda: self.client.delete_object(
                    Bucket=self.bucket, Key=self._key(key), IfMatch=version))
                return True
            except ClientError as e:
                if status(e) in REFUSED or code(e) == "NoSuchKey":
                    return False
                raise

    def check_conditional_writes(self) -> None:
        """Once per server and bucket: a throwaway key created twice, then replaced and
        deleted with a wrong version, must be refused each time (a claim's release is a
        conditional delete)."""
        if (self.config.endpoint, self.bucket) in _conditions_checked:
            return
        key = f".cectl-conditions-{uuid.uuid4().hex}"
        self.write_if(key, b"first", None)
        try:
            wrong = '"not-its-etag"'
            for header, method, version in (("If-None-Match", "PUT", None),
                                            ("If-Match", "PUT", wrong),
                                            ("If-Match", "DELETE", wrong)):
                went_through = (self.delete_if(key, version) if method == "DELETE"
                                else self.write_if(key, b"again", version) is not None)
                if went_through:
                    raise BadInput(
                        f"the S3 server at {self.config.where} ignores {header} on {method}, "
                        "so it cannot keep two trainings of one run apart: train on a server "
                        "that honours conditional writes (AWS S3, SeaweedFS)")
        finally:
            self.delete(key)
        _conditions_checked.add((self.config.endpoint, self.bucket))

    def clear_partial_writes(self, prefix: str = "") -> None:
        below, inside = self._below(prefix)
        with self._errors():
            pages = self._request(lambda: list(self.client.get_paginator(
                "list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=below)))
            for upload in (u for page in pages for u in page.get("Uploads", [])
                           if inside(u["Key"])):
                self._request(lambda u=upload: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]))

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.versions(prefix))

    def versions(self, prefix: str = "") -> dict[str, str]:
        root = f"{self.prefix}/" if self.prefix else ""
        below, inside = self._below(prefix)
        with self._errors():
            pages = self._request(lambda: list(self.client.get_paginator(
                "list_objects_v2").paginate(Bucket=self.bucket, Prefix=below)))
        return {obj["Key"][len(root):]: obj["ETag"] for page in pages
                for obj in page.get("Contents", []) if inside(obj["Key"])}

    def delete(self, key: str) -> None:
        with self._errors():
            self._request(lambda: self.client.delete_object(Bucket=self.bucket,
                                                            Key=self._key(key)))

    def arrow_fs(self) -> tuple[object, str]:
        return self.config.arrow_filesystem(), f"{self.bucket}/{self.prefix}".rstrip("/")


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
            store = self._store
            with store._errors():
                try:
                    response = store._request(lambda: store.client.get_object(
                        Bucket=store.bucket, Key=self._key, **extra))
                except ClientError as e:
                    if code(e) == "InvalidRange":
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
                if not transient(e) or drop == self.REOPENS:
                    raise self._store._explain(e) from None
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()
