"""Shared fixtures: real S3 servers over HTTP on 127.0.0.1 (moto, SeaweedFS), the shared
images, the CLI in this process, and shards and checkpoints built once per session."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import boto3
import pytest
from helpers import Result, free_port, shard_images, train_checkpoint

PARIS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paris-streetview-eval"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free local port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Point the standard AWS settings (and so cectl and its subprocesses) at the server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory):
    """SeaweedFS for the whole session, started on first use (about 3.5 s)."""
    from seaweed import seaweed_server

    with seaweed_server(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def seaweed(seaweed_server, monkeypatch):
    """The AWS settings pointed at SeaweedFS; the server, for tests to kill or pause. It is
    running again after the test."""
    from seaweed import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield seaweed_server
    seaweed_server.ensure_up()


@pytest.fixture
def seaweed_bucket(seaweed) -> str:
    """A new bucket; deleted with its objects after the test (each holds a volume)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=seaweed.endpoint)
    client.create_bucket(Bucket=name)
    yield name
    seaweed.ensure_up()
    client.delete_bucket(Bucket=name)  # SeaweedFS deletes non-empty buckets


@pytest.fixture
def paris() -> Path:
    if not PARIS.is_dir():
        pytest.skip(f"shared Paris StreetView images not found at {PARIS}")
    return PARIS


@pytest.fixture
def cli(capsys, monkeypatch):
    """`cectl ARGS...` in this process, through `cectl.cli.run`: its exit code and output.

    The consoles print to sys.stdout and sys.stderr as they are at print time, which capsys
    holds. `env` is set for the test (and fresh S3 clients made for it)."""
    from cectl import s3_client
    from cectl.cli import run

    def invoke(*args, env: dict[str, str] | None = None) -> Result:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        if env:
            monkeypatch.setattr(s3_client, "_clients", {})
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def facade_shards(tmp_path_factory) -> str:
    """Generated facade images, sharded to local disk with a val split (session-wide)."""
    from cectl.demo import make_facades

    root = tmp_path_factory.mktemp("facades")
    make_facades(root / "images", 96, size=72)
    shard_images(root / "images", root / "shards", shard_size=16, val_fraction=0.15)
    return str(root / "shards")


@pytest.fixture(scope="session")
def tiny_checkpoint(facade_shards, tmp_path_factory) -> str:
    """A few steps of a tiny joint-loss center model; the path of its checkpoint folder."""
    return train_checkpoint(facade_shards, tmp_path_factory.mktemp("store"), "tiny",
                            "train.steps=4")


@pytest.fixture(scope="session")
def random_mask_checkpoint(facade_shards, tmp_path_factory) -> str:
    """Two steps of a tiny random-region model (it predicts whole images); the path of its
    checkpoint folder."""
    return train_checkpoint(facade_shards, tmp_path_factory.mktemp("store"), "random",
                            "mask.kind=random-region", "train.steps=2")
