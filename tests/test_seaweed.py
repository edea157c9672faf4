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
from helpers import TINY, cectl_process, wait_for

from cectl import s3, s3_client
from cectl.cli import run as cli
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
                                                     capsys):
    images = os.path.join(os.path.dirname(facade_shards), "images")
    shards, store = f"s3://{seaweed_bucket}/shards", f"s3://{seaweed_bucket}/store"
    assert cli(["shard", images, shards, "--shard-size", "16", "--val-fraction", "0.15",
                "--workers", "2"]) == 0
    assert cli(["verify", shards]) == 0
    capsys.readouterr()
    train = ["train", *TINY, "train.steps=4", "train.checkpoint_every=2", "--data", shards,
             "--store", store, "--name", "e2e", "--json"]
    assert cli(train) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert cli(["pull", "e2e", "--store", store, "--dest", str(tmp_path)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "e2e" / "step-000004").iterdir()) == [
        "model.safetensors", "state.json"]
    assert cli(["train", "train.steps=6", "--store", store, "--name", "e2e", "--resume",
                "--json"]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert (summary["step"], summary["resumes"]) == (6, 1)
    assert cli(train) == 2 and "already exists" in capsys.readouterr().err
    run = Run(open_store(store), "e2e")
    assert run.steps() == [2, 4, 6] and not run.store.exists(CLAIM)
    assert pending_uploads(seaweed_bucket) == []


def test_uploads_and_reads_ride_out_a_server_killed_and_restarted(seaweed, seaweed_bucket,
                                                                  small_parts, tmp_path):
    store = open_store(f"s3://{seaweed_bucket}/x")
    big, small = os.urandom(13 * 2**20), os.urandom(2**20)
    (tmp_path / "big").write_bytes(big)
    store.write_bytes("old", small)
    done: dict[str, object] = {}

    def attempt(name: str, call) -> None:
        try:
            done[name] = call()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            done[name] = e

    seaweed.pause()  # every request from here on waits, then meets a dead server
    began = time.monotonic()
    threads = [threading.Thread(target=attempt, args=args) for args in (
        ("multipart", lambda: store.put_file(tmp_path / "big", "big")),
        ("put", lambda: store.write_bytes("small", small)),
        ("get", lambda: store.read_bytes("old")))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    seaweed.kill()
    time.sleep(2)
    seaweed.start()
    outage = time.monotonic() - began
    for thread in threads:
        thread.join(120)
    assert done == {"multipart": None, "put": None, "get": small}, done
    assert store.read_bytes("big") == big and store.read_bytes("small") == small
    assert pending_uploads(seaweed_bucket) == []
    print(f"rode out an outage of {outage:.1f} s")


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
    deadline = time.monotonic() + 30
    while not pending_uploads(seaweed_bucket) and time.monotonic() < deadline:
        time.sleep(0.01)
    seaweed.kill()  # mid-upload: its abort cannot reach the server either
    thread.join(60)
    assert failed and "cannot reach S3" in str(failed[0])
    seaweed.start()
    assert pending_uploads(seaweed_bucket) == ["store/runs/r/checkpoints/step-000002/"
                                               "model.safetensors"]
    run.claim(resume=True).release()
    assert pending_uploads(seaweed_bucket) == [] and run.store.list() == []


def test_a_run_whose_first_checkpoint_failed_resumes_from_step_0(facade_shards, seaweed,
                                                                 seaweed_bucket, capsys):
    store = f"s3://{seaweed_bucket}/store"
    run = Run(open_store(store), "first")
    job = cectl_process("train", *TINY, "train.steps=20", "train.checkpoint_every=10",
                        "--data", facade_shards, "--store", store, "--name", "first",
                        setup="import cectl.s3_client as c; c.REQUEST_DEADLINE_S = 2.0")
    wait_for(lambda: run.store.exists("config.yaml"), job)
    seaweed.kill()  # before the first checkpoint
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1 and "cannot reach S3" in err and "Traceback" not in err
    seaweed.start()
    assert run.steps() == []
    assert cli(["train", "train.steps=3", "--store", store, "--name", "first", "--resume",
                "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["step"] == 3


def test_a_hung_server_is_given_up_within_the_deadline_and_named(seaweed, seaweed_bucket,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(s3_client, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(s3_client, "REQUEST_DEADLINE_S", 2.0)
    seaweed.pause()
    began = time.monotonic()
    code = cli(["runs", "--store", f"s3://{seaweed_bucket}/store"])
    waited = time.monotonic() - began
    message = capsys.readouterr().err
    assert code == 1 and waited < 10, (waited, message)
    assert f"S3 at {seaweed.endpoint} accepts connections but did not answer" in message
