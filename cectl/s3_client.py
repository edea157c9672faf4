"""Talking to an S3 server: the one client configuration (for cectl's boto3 client and Ray's
pyarrow filesystem), a client per process, the retries of every request, error sentences.

cectl retries each request on its own (`request`): botocore's standard mode shares one
retry budget among all requests of a client, and the parallel parts of one large upload
spend it within a second of an outage, leaving every later request without retries.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

from cectl.errors import BadInput, CectlError, Failure
from cectl.storage import mask_userinfo

THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                  "RequestLimitExceeded", "TooManyRequestsException", "InternalError"}
# A request is tried up to max_attempts times, backing off from BACKOFF_S, doubling up to
# BACKOFF_CAP_S (each wait jittered down to half), and no retry starts after
# REQUEST_DEADLINE_S: ten attempts ride out 13 to 26 s without a connection, and a server
# that accepts connections but never answers is given up within READ_TIMEOUT_S of that.
BACKOFF_S = 0.2
BACKOFF_CAP_S = 5.0
REQUEST_DEADLINE_S = 60.0
READ_TIMEOUT_S = 30.0
T = TypeVar("T")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Config:
    """The one S3 client configuration, for cectl's boto3 client and Ray's pyarrow filesystem."""

    endpoint: str | None
    region: str
    max_attempts: int = 10  # per request, as AWS_MAX_ATTEMPTS counts them (first try included)
    connect_timeout: float = 3.0
    read_timeout: float = READ_TIMEOUT_S

    @classmethod
    def from_environment(cls) -> S3Config:
        """Endpoint, region and attempts from the standard AWS chain."""
        import botocore.session

        chain = botocore.session.get_session()
        return cls(endpoint=endpoint_url(),
                   region=chain.get_config_variable("region") or "us-east-1",
                   max_attempts=max(1, chain.get_config_variable("max_attempts")
                                    or cls.max_attempts),
                   read_timeout=READ_TIMEOUT_S)

    @property
    def where(self) -> str:
        """The endpoint, for messages."""
        return mask_userinfo(self.endpoint or "AWS S3")

    def boto_client(self):
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            retries={"mode": "standard", "total_max_attempts": 1},  # `request` retries
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


_clients: dict[tuple[int, S3Config], object] = {}


def client_for(config: S3Config):
    """The boto3 client of this process for `config`: clients are thread-safe but must not
    cross a fork."""
    key = (os.getpid(), config)
    if key not in _clients:
        _clients[key] = config.boto_client()
    return _clients[key]


def status(e: Exception) -> int:
    return getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def transient(e: Exception) -> bool:
    """Whether a retry may get past `e`: a lost connection, a timeout, 5xx, throttling."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, ClientError):
        return status(e) in (500, 502, 503, 504) or code(e) in THROTTLE_CODES
    return isinstance(e, HTTPClientError | BotoConnectionError | ResponseStreamingError
                      | IncompleteReadError | ConnectionError | TimeoutError)


def request(config: S3Config, call: Callable[[], T], stop: threading.Event | None = None) -> T:
    """`call()`, retried on transient errors; a one-sentence Failure once retries are spent.
    `stop` ends the retries early (the other parts of a failed multipart upload)."""
    stop = stop or threading.Event()
    start = time.monotonic()
    for attempt in range(1, config.max_attempts + 1):
        try:
            return call()
        except Exception as e:
            if not transient(e):
                raise
            elapsed = time.monotonic() - start
            wait = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
            if (attempt == config.max_attempts or elapsed + wait > REQUEST_DEADLINE_S
                    or stop.wait(wait)):
                raise unreachable(e, config, f", {attempt} tries in {elapsed:.0f} s") from None
    raise AssertionError("max_attempts is at least 1")


def unreachable(e: Exception, config: S3Config, tries: str = "") -> Failure:
    """The sentence for a transient error that retries did not get past."""
    from botocore.exceptions import ReadTimeoutError

    if isinstance(e, ReadTimeoutError):
        return Failure(f"S3 at {config.where} accepts connections but did not answer within "
                       f"{config.read_timeout:.0f} s{tries}: the server is hung or overloaded")
    if status(e):
        return Failure(f"S3 request to {config.where} kept failing ({code(e) or status(e)}"
                       f"{tries})")
    return Failure(f"cannot reach S3 at {config.where} ({type(e).__name__}{tries}): check "
                   "AWS_ENDPOINT_URL and the network")


def explain(e: Exception, config: S3Config, bucket: str, prefix: str) -> Exception:
    """A boto error as a one-sentence CectlError; other errors as they are."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(e, CectlError):
        return e
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return BadInput("no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, ClientError):
        if code(e) == "NoSuchBucket" or (status(e) == 404 and code(e) in ("404", "NotFound", "")):
            return BadInput(f"bucket {bucket!r} does not exist at {config.where}: create it or "
                            "fix the URI")
        if code(e) == "NoSuchKey":
            return BadInput(f"an object is missing in s3://{bucket}/{prefix}")
        if code(e) in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                       "InvalidToken", "ExpiredToken", "403", "Forbidden"):
            return BadInput(f"access to s3://{bucket} denied ({code(e)}): check "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile")
        return Failure(f"S3 request to {config.where} failed: {code(e) or status(e)}")
    if transient(e):
        return unreachable(e, config)
    return e
