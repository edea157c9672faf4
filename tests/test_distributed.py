"""`cectl train --nodes N` on a real local multi-node Ray cluster (CPU workers, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest
from helpers import TINY, cectl, local_cluster

RAY_ARGS = ["--nodes", "2", "--cpu"]


@pytest.fixture(scope="module")
def cluster():
    """`cectl cluster local --nodes 2`: two raylets on this machine; yields the address."""
    with local_cluster(2) as (address, _):
        yield address


def test_ddp_on_two_nodes_checkpoints_to_s3_with_identical_weights(cluster, facade_shards,
                                                                    s3_env, bucket):
    store = f"s3://{bucket}/store"
    result = cectl("train", *TINY, "train.steps=8", "train.checkpoint_every=4",
                   "--data", facade_shards, "--store", store, "--name", "ddp", *RAY_ARGS,
                   "--address", cluster, "--json", timeout=400)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["step"], summary["workers"]) == (8, 2)
    s3 = boto3.client("s3", endpoint_url=s3_env)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="store/runs/ddp/")
            ["Contents"]}
    for step in ("000004", "000008"):
        assert f"store/runs/ddp/checkpoints/step-{step}/model.safetensors" in keys
        assert f"store/runs/ddp/checkpoints/step-{step}/state.json" in keys
    # Ray Train's own run state went through the pyarrow filesystem to the same bucket.
    assert any(k.startswith("store/ray/") for k in
               (o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="store/ray/")
                .get("Contents", [])))


def train_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_a_killed_worker_resumes_from_the_last_checkpoint(cluster, facade_shards, tmp_path):
    store = tmp_path / "store"
    job = subprocess.Popen(
        [sys.executable, "-m", "cectl", "train", *TINY, "train.steps=150",
         "train.checkpoint_every=20", "--data", facade_shards, "--store", str(store),
         "--name", "ft", *RAY_ARGS, "--address", cluster, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    marker = store / "runs/ft/checkpoints/step-000040/state.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached step 40"
    victims = train_workers()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, err
    summary = json.loads(out)
    assert (summary["step"], summary["workers"]) == (150, 2) and summary["resumes"] >= 1
    text = (store / "runs/ft/metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    resumed = [m["step"] for m in lines if "resumed" in m]
    assert resumed and resumed[0] >= 40  # from a checkpoint, not from scratch
    steps = [m["step"] for m in lines if "loss_rec" in m]
    assert steps[-1] == 150 and steps == sorted(steps)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--nodes", "0", "--cpu"], "at least 1"),
     (["--nodes", "1", "--gpus-per-node", "2"], "the cluster has 0 GPUs"),
     (["--nodes", "4", "--gpus-per-node", "4", "--cpu"], "16 CPU workers")],
)
def test_impossible_requests_exit_2_quickly(args, message, cluster, facade_shards, tmp_path):
    start = time.monotonic()
    result = cectl("train", *TINY, "--data", facade_shards, "--store", tmp_path, *args,
                   "--address", cluster, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 60


def test_unreachable_address_exits_2(facade_shards, tmp_path):
    from helpers import free_port

    result = cectl("train", *TINY, "--data", facade_shards, "--store", tmp_path, *RAY_ARGS,
                   "--address", f"127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 2
    assert "cannot reach a Ray cluster" in result.stderr



def test_joining_a_cluster_that_is_not_local_exits_2():
    result = cectl("cluster", "local", "--join", "10.1.2.3:6379", "--nodes", "1", timeout=60)
    assert result.returncode == 2
    assert "127.0.0.1:PORT" in result.stderr and "Traceback" not in result.stderr
