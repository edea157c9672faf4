"""Elastic training: checkpoints saved in the background that a crash cannot half-write,
and a worker group that loses a node of a real local multi-node Ray cluster and goes on
smaller. (The loader's side, a data position that holds whatever the world size, is
tests/test_loader.py's.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest
from helpers import (
    TINY,
    FlakyProxy,
    cectl,
    joined_nodes,
    kill_a_training_node,
    local_cluster,
    train_keys,
)

from cectl.data import SAMPLE_LOG, GlobalOrder, train_shards
from cectl.shard_format import open_manifest
from cectl.storage import open_store

pytestmark = pytest.mark.slow  # a Ray cluster, a crash, a slow link: minutes


def test_a_crash_during_a_background_upload_resumes_from_the_last_complete_checkpoint(
        facade_shards, s3_env, bucket, tmp_path):
    # A slow link to S3: a checkpoint of the tiny model (~300 KB) takes 12 s to upload.
    proxy = FlakyProxy(int(s3_env.rsplit(":", 1)[1]), rate=25_000)
    log = tmp_path / "samples.jsonl"
    args = ["train", *TINY, "train.steps=30", "train.checkpoint_every=10", "--data",
            facade_shards, "--store", f"s3://{bucket}/store", "--name", "crash", "--local"]
    job = subprocess.Popen([sys.executable, "-m", "cectl", *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "AWS_ENDPOINT_URL": proxy.url, SAMPLE_LOG: str(log)})
    s3 = boto3.client("s3", endpoint_url=s3_env)
    prefix = "store/runs/crash/checkpoints/"

    def complete() -> set[str]:
        found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"][len(prefix):-len("/state.json")] for o in found
                if o["Key"].endswith("/state.json")}

    deadline = time.monotonic() + 120
    while "step-000010" not in complete() and time.monotonic() < deadline:
        time.sleep(0.1)
    # Step 10 is stored, so step 20's upload is starting: wait until training goes on.
    while (not log.exists() or len(log.read_text().splitlines()) < 23) and job.poll() is None:
        time.sleep(0.05)
    job.kill()
    job.wait()
    assert job.returncode == -signal.SIGKILL, job.stderr.read()
    assert complete() == {"step-000010"}  # step 20 was still uploading: not visible
    proxy.rate = None
    result = cectl(*args, "--resume", "--json", env={SAMPLE_LOG: ""}, check=True)
    assert json.loads(result.stdout)["step"] == 30
    lines = s3.get_object(Bucket=bucket, Key="store/runs/crash/metrics.jsonl")["Body"].read()
    resumed = [m["step"] for m in map(json.loads, lines.decode().splitlines()) if "resumed" in m]
    assert resumed == [10]


def test_a_group_going_2_1_3_as_nodes_die_and_join_sees_each_sample_once(
        facade_shards, s3_env, bucket, tmp_path):
    # The store is on S3 behind a slow link (100 KB/s: a checkpoint of the tiny model,
    # ~300 KB, takes 3 s), and a save waits for the one before: that paces the run at
    # about a step a second whatever the CPU, so each world size lasts long enough to be
    # seen. A global batch of 12 keeps the batches the same whatever the world.
    proxy = FlakyProxy(int(s3_env.rsplit(":", 1)[1]), rate=100_000)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    log = tmp_path / "samples.jsonl"

    def worlds() -> list[int]:
        seen = [b["world"] for b in map(json.loads, log.read_text().splitlines())
                if "keys" in b] if log.exists() else []
        return [w for i, w in enumerate(seen) if i == 0 or seen[i - 1] != w]

    def saved_by_a_group_of(world: int) -> bool:
        keys = [o["Key"] for o in s3.list_objects_v2(
            Bucket=bucket, Prefix="store/runs/elastic/checkpoints/").get("Contents", [])]
        return any(json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["world"]
                   == world for key in keys if key.endswith("/state.json"))

    def wait_for(done, what: str) -> None:
        deadline = time.monotonic() + 180
        while not done():
            assert job.poll() is None, f"the run ended before {what}: {job.stderr.read()}"
            assert time.monotonic() < deadline, f"no {what} in 180 s"
            time.sleep(0.2)

    with local_cluster(2, cpus=1) as (address, cluster_pid):
        job = subprocess.Popen(
            [sys.executable, "-m", "cectl", "train", *TINY, "train.steps=80",
             "data.batch_policy=global", "data.batch_size=12", "train.checkpoint_every=5",
             "train.resize_check_s=2", "--data", facade_shards, "--store",
             f"s3://{bucket}/store", "--name", "elastic", "--nodes", "1:3", "--cpu",
             "--address", address, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "COLUMNS": "200", "AWS_ENDPOINT_URL": proxy.url,
                 SAMPLE_LOG: str(log)})
        wait_for(lambda: s3.list_objects_v2(
            Bucket=bucket, Prefix="store/runs/elastic/checkpoints/step-000005/state.json",
        ).get("KeyCount"), "step 5")
        kill_a_training_node(cluster_pid)
        wait_for(lambda: worlds()[-1] == 1, "a group of 1")
        # Its own checkpoint first: a group of 3 started before it would resume from the
        # group of 2's and say "resized from 2 to 3".
        wait_for(lambda: saved_by_a_group_of(1), "a checkpoint of the group of 1")
        # One node of 2 CPUs: two of 1 might register on either side of one of Ray's
        # resource refreshes, and the group would grow 1 -> 2 -> 3.
        with joined_nodes(address, 1, cpus=2):
            wait_for(lambda: worlds()[-1] == 3, "a group of 3")
            out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert "1 to 3 CPU workers on 1 to 3 nodes (elastic)" in err
    assert "resized from 2 to 1 workers" in err and "resized from 1 to 3 workers" in err
    summary = json.loads(out)
    assert (summary["step"], summary["workers"], summary["resizes"]) == (80, 3, 2)
    assert worlds() == [2, 1, 3]
    # Every position always held the same sample, the one the seed's global order puts
    # there (steps after a checkpoint were redone by the next group), none was skipped,
    # and each epoch is every train sample once.
    by_position: dict[int, str] = {}
    batches = [b for b in map(json.loads, log.read_text().splitlines()) if "keys" in b]
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            assert by_position.setdefault(batch["position"] + i, key) == key
    assert sorted(by_position) == list(range(len(by_position)))
    order = GlobalOrder(open_store(facade_shards), train_shards(open_manifest(facade_shards)), 0)
    assert all(key == order.sample(p)["__key__"] for p, key in sorted(by_position.items()))
    keys = train_keys(facade_shards)
    for epoch in range(len(by_position) // len(keys)):
        assert sorted(by_position[epoch * len(keys) + i] for i in range(len(keys))) == sorted(keys)
    # The group that finished kept its three replicas in step.
    ends = [r for r in map(json.loads, log.read_text().splitlines()) if "weights" in r]
    assert sorted((r["world"], r["rank"]) for r in ends) == [(3, 0), (3, 1), (3, 2)]
    assert len({r["weights"] for r in ends}) == 1
