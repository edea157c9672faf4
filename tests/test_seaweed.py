"""cectl against a real S3-compatible server, SeaweedFS, started by the fixtures: the whole
flow, and the faults a mock cannot show: a server killed with kill -9 and restarted, and
one that accepts connections and answers nothing."""

from __future__ import annotations

import json
import os
import threading
import time

import boto3
import pytest
from helpers import TINY, Result, assert_refused, cectl_process, wait_for

from cectl import s3, s3_client
from cectl.errors import Failure
from cectl.runs import CLAIM, Run
from cectl.storage import open_store

pytestmark = pytest.mark.slow


def pending_uploads(bucket: str) -> list[str]:
    return [u["Key"] for u in boto3.client("s3").list_multipart_uploads(Bucket=bucket)
            .get("Uploads", [])]


@pytest.fixture
def small_parts(monkeypatch):
    """Multipart uploads from 6 MiB, in 5 MiB parts (S3's smallest)."""
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 6 * 2**20)
    monkeypatch.setattr(s3, "PART_SIZE", 5 * 2**20)


def test_shard_verify_train_pull_resume_on_seaweedfs(facade_shards, seaweed_bucket, tmp_path,
                                                     cli):
    images = os.path.join(os.path.dirname(facade_shards), "images")
    shards, store = f"s3://{seaweed_bucket}/shards", f"s3://{seaweed_bucket}/store"
    for args in (["shard", images, shards, "--shard-size", "16", "--val-fraction", "0.15",
                  "--workers", "1"], ["verify", shards]):
        assert cli(*args).returncode == 0
    train = ["train", *TINY, "train.steps=4", "train.checkpoint_every=2", "--data", shards,
             "--store", store, "--name", "e2e", "--json"]
    trained = cli(*train)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["step"] == 4
    assert cli("pull", "e2e", "--store", store, "--dest", tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "e2e" / "step-000004").iterdir()) == [
        "model.safetensors", "state.json"]
    resumed = cli("train", "train.steps=6", "--store", store, "--name", "e2e", "--resume",
                  "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["step"], summary["resumes"]) == (6, 1)
    assert_refused(cli(*train), 2, "'e2e'", "already exists")
    run = Run(open_store(store), "e2e")
    assert run.steps() == [2, 4, 6] and not run.store.exists(CLAIM)
    assert pending_uploads(seaweed_bucket) == []


def test_uploads_and_reads_ride_out_a_server_killed_and_restarted(seaweed, seaweed_bucket,
                                                                  small_parts, tmp_path):
    store = open_store(f"s3://{seaweed_bucket}/x")
    big, small = os.urandom(40 * 2**20), os.urandom(2**20)
    (tmp_path / "big").write_bytes(big)
    store.write_bytes("old", small)
    done: dict[str, object] = {}

    def attempt(name: str, call) -> None:
        try:
            done[name] = call()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            done[name] = e

    upload = lambda: store.put_file(tmp_path / "big", "big")  # noqa: E731
    threads = [threading.Thread(target=attempt, args=("multipart", upload))]
    threads[0].start()
    wait_until_uploading(seaweed_bucket)
    seaweed.kill()  # 8 parts in flight: together they used to spend the retry budget at once
    began = time.monotonic()
    threads += [threading.Thread(target=attempt, args=args) for args in (
        ("put", lambda: store.write_bytes("small", small)),
        ("get", lambda: store.read_bytes("old")))]
    for thread in threads[1:]:
        thread.start()
    time.sleep(2)
    seaweed.start()
    outage = time.monotonic() - began
    for thread in threads:
        thread.join(120)
    assert done == {"multipart": None, "put": None, "get": small}, done
    assert store.read_bytes("big") == big and store.read_bytes("small") == small
    assert pending_uploads(seaweed_bucket) == []  # the upload was completed, not restarted
    print(f"rode out an outage of {outage:.1f} s")


def wait_until_uploading(bucket: str) -> None:
    """Until a multipart upload is pending in `bucket`: its parts are going up."""
    deadline = time.monotonic() + 30
    while not pending_uploads(bucket):
        assert time.monotonic() < deadline, "no multipart upload started"
        time.sleep(0.01)


def test_a_failed_upload_leaves_nothing_once_its_run_is_claimed_again(seaweed, seaweed_bucket,
                                                                     small_parts, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(s3_client, "REQUEST_DEADLINE_S", 2.0)
    (tmp_path / "big").write_bytes(os.urandom(40 * 2**20))
    run = Run(open_store(f"s3://{seaweed_bucket}/store"), "r")
    failed: list[Exception] = []

    def upload() -> None:
        try:
            run.store.put_file(tmp_path / "big", "checkpoints/step-000002/model.safetensors")
        except Failure as e:
            failed.append(e)

    thread = threading.Thread(target=upload)
    thread.start()
    wait_until_uploading(seaweed_bucket)
    seaweed.kill()  # mid-upload: its abort cannot reach the server either
    thread.join(60)
    assert_refused(failed[0], 1, "cannot reach S3", seaweed.endpoint)
    seaweed.start()
    assert pending_uploads(seaweed_bucket) == ["store/runs/r/checkpoints/step-000002/"
                                               "model.safetensors"]
    run.claim(resume=True).release()
    assert pending_uploads(seaweed_bucket) == [] and run.store.list() == []


def test_a_run_whose_first_checkpoint_failed_resumes_from_step_0(facade_shards, seaweed,
                                                                 seaweed_bucket, cli):
    store = f"s3://{seaweed_bucket}/store"
    run = Run(open_store(store), "first")
    job = cectl_process("train", *TINY, "train.steps=20", "train.checkpoint_every=10",
                        "--data", facade_shards, "--store", store, "--name", "first",
                        setup="import cectl.s3_client as c; c.REQUEST_DEADLINE_S = 2.0")
    wait_for(lambda: run.store.exists("config.yaml"), job)
    seaweed.kill()  # before the first checkpoint
    out, err = job.communicate(timeout=120)
    assert_refused(Result(job.returncode, out, err), 1, "cannot reach S3", seaweed.endpoint)
    seaweed.start()
    assert run.steps() == []
    resumed = cli("train", "train.steps=3", "--store", store, "--name", "first", "--resume",
                  "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["step"] == 3


def test_a_hung_server_is_given_up_within_the_deadline_and_named(seaweed, seaweed_bucket,
                                                                monkeypatch, cli):
    monkeypatch.setattr(s3_client, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(s3_client, "REQUEST_DEADLINE_S", 2.0)
    seaweed.pause()
    began = time.monotonic()
    refusal = cli("runs", "--store", f"s3://{seaweed_bucket}/store")
    assert time.monotonic() - began < 10
    assert_refused(refusal, 1, f"S3 at {seaweed.endpoint} accepts connections but did not "
                   "answer within 1 s")
