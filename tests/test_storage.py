"""The storage layer against local disk and a real S3 server."""

from __future__ import annotations

import os

import boto3
import pytest
from helpers import FlakyProxy, assert_refused

from cectl import s3
from cectl.errors import BadInput, Failure
from cectl.storage import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"s3://{request.getfixturevalue('bucket')}/some/prefix")


def test_write_read_list_delete(store):
    store.write_bytes("a/b.bin", b"hello")
    store.write_bytes("c.bin", b"world")
    assert store.exists("a/b.bin") and not store.exists("a/missing")
    assert store.read_bytes("a/b.bin") == b"hello"
    assert store.list() == ["a/b.bin", "c.bin"]
    assert store.list("a/") == ["a/b.bin"]
    store.delete("c.bin")
    assert store.list() == ["a/b.bin"]


def test_large_file_goes_up_in_parts_and_comes_back_whole(store, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 6 * 2**20)
    monkeypatch.setattr(s3, "PART_SIZE", 5 * 2**20)
    data = os.urandom(13 * 2**20)
    (tmp_path / "big").write_bytes(data)
    store.put_file(tmp_path / "big", "big.bin")
    store.get_file("big.bin", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    if isinstance(store, s3.S3Store):  # a multipart ETag ends in the number of parts
        head = store.client.head_object(Bucket=store.bucket, Key=store._key("big.bin"))
        assert head["ETag"].strip('"').endswith("-3")


def test_local_write_is_atomic_and_leaves_no_partial(tmp_path, monkeypatch):
    store = open_store(str(tmp_path))
    store.write_bytes("x.bin", b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_bytes("x.bin", b"new")
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_s3_stream_resumes_when_the_connection_drops(s3_env, bucket, monkeypatch):
    data = os.urandom(24 * 2**20)
    open_store(f"s3://{bucket}").write_bytes("blob", data)
    proxy = FlakyProxy(int(s3_env.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    reader = open_store(f"s3://{bucket}").open("blob")
    first = reader.read(2**20)
    proxy.drop_for(0.3)  # mid-body: the reader must reopen at its offset
    rest = b"".join(iter(lambda: reader.read(2**16), b""))
    proxy.close()
    assert first + rest == data
    assert proxy.dropped > 0


def test_boto_client_and_arrow_filesystem_share_one_configuration(s3_env, bucket, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    store = open_store(f"s3://{bucket}/x")
    fs, _ = store.arrow_fs()
    assert store.client.meta.region_name == fs.region == "eu-west-3"
    assert store.client.meta.endpoint_url == s3_env
    assert store.config.max_attempts == 4  # cectl's own retries: botocore tries once
    assert store.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 1}


def test_unknown_scheme_is_bad_input():
    with pytest.raises(BadInput) as caught:
        open_store("gs://bucket/x")
    assert_refused(caught.value, 2, "'gs://bucket/x'", "s3://")


def test_arrow_filesystem_reads_what_the_store_wrote(store):
    import pyarrow.fs

    store.write_bytes("dir/file.txt", b"arrow sees this")
    fs, root = store.arrow_fs()
    with fs.open_input_stream(f"{root}/dir/file.txt") as f:
        assert f.read() == b"arrow sees this"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/dir"))
    assert [info.base_name for info in infos] == ["file.txt"]


def test_a_multipart_upload_the_server_refuses_is_aborted(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 6 * 2**20)
    monkeypatch.setattr(s3, "PART_SIZE", 2**20)  # below S3's 5 MiB: refused at completion
    (tmp_path / "big").write_bytes(os.urandom(7 * 2**20))
    with pytest.raises(Failure) as caught:
        open_store(f"s3://{bucket}/x").put_file(tmp_path / "big", "big")
    assert_refused(caught.value, 1, "EntityTooSmall")
    assert boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads") is None


def test_a_run_folder_lists_only_its_own_keys_not_longer_names(store):
    store.write_bytes("runs/a/config.yaml", b"a")
    store.write_bytes("runs/ab/config.yaml", b"ab")
    store.write_bytes("runs-old/b/config.yaml", b"b")
    store.write_bytes("runs/a/checkpoints/step-1000/state.json", b"1")
    store.write_bytes("runs/a/checkpoints/step-10000/state.json", b"2")
    assert store.child("runs/a").list() == [
        "checkpoints/step-1000/state.json", "checkpoints/step-10000/state.json", "config.yaml"]
    assert store.list("runs/") == store.list("runs") == [
        "runs/a/checkpoints/step-1000/state.json", "runs/a/checkpoints/step-10000/state.json",
        "runs/a/config.yaml", "runs/ab/config.yaml"]
    assert store.list("runs/a/checkpoints/step-1000/") == [
        "runs/a/checkpoints/step-1000/state.json"]
    assert store.list("runs/a/config.yaml") == ["runs/a/config.yaml"]


def test_the_local_store_lists_linked_folders_once_each(tmp_path):
    elsewhere = tmp_path / "other-disk" / "n01440764"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.JPEG").write_bytes(b"a")
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    (root / "train" / "n01440764").symlink_to(elsewhere)
    (root / "train" / "loop").symlink_to(root / "train")  # a link to a folder above
    assert open_store(str(root)).list() == ["train/n01440764/a.JPEG"]
