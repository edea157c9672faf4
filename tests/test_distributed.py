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
import torch
from helpers import TINY, assert_refused, cectl, local_cluster, tiny_job, train_workers

from cectl.data import SAMPLE_LOG

pytestmark = pytest.mark.slow  # a local Ray cluster of two nodes: minutes

RAY_ARGS = ["--nodes", "2", "--cpu"]


@pytest.fixture(scope="module")
def cluster():
    """`cectl cluster local --nodes 2`: two raylets on this machine; yields the address and
    the process id of the `cectl cluster local` that owns them."""
    with local_cluster(2) as started:
        yield started


def test_ddp_on_two_nodes_checkpoints_to_s3_with_identical_weights(cluster, facade_shards,
                                                                    s3_env, bucket, tmp_path):
    from cectl.model import build_models, weights_digest
    from cectl.restore import load_checkpoint, restore_tensors

    store = f"s3://{bucket}/store"
    log = tmp_path / "debug.jsonl"  # each rank writes its weights' digest here at the end
    result = cectl("train", *TINY, "train.steps=8", "train.checkpoint_every=4",
                   "--data", facade_shards, "--store", store, "--name", "ddp", *RAY_ARGS,
                   "--address", cluster[0], "--json", env={SAMPLE_LOG: str(log)}, timeout=400)
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
    # Both replicas ended with the same weights, those of the last checkpoint.
    ends = [r for r in map(json.loads, log.read_text().splitlines()) if "weights" in r]
    assert sorted((r["world"], r["rank"]) for r in ends) == [(2, 0), (2, 1)]
    generator, discriminator = build_models(tiny_job(facade_shards))
    tensors, _ = load_checkpoint(f"{store}/runs/ddp/checkpoints/step-000008")
    restore_tensors(tensors, {"G": generator, "D": discriminator}, {})
    assert {r["weights"] for r in ends} == {weights_digest(generator, discriminator)}


def test_a_killed_worker_resumes_from_the_last_checkpoint(cluster, facade_shards, tmp_path):
    address, cluster_pid = cluster
    store = tmp_path / "store"
    job = subprocess.Popen(
        [sys.executable, "-m", "cectl", "train", *TINY, "train.steps=150",
         "train.checkpoint_every=20", "--data", facade_shards, "--store", str(store),
         "--name", "ft", *RAY_ARGS, "--address", address, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    marker = store / "runs/ft/checkpoints/step-000040/state.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached step 40"
    victims = train_workers(cluster_pid)  # of this test's cluster, running this job alone
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
    ("args", "names"),
    [(["--nodes", "0", "--cpu"], ["--nodes"]),
     (["--nodes", "1", "--gpus-per-node", "2"], ["2 GPU workers", "0 GPUs", "--cpu"]),
     (["--nodes", "4", "--gpus-per-node", "4", "--cpu"], ["16 CPU workers", "CPUs"])],
)
def test_impossible_requests_exit_2_quickly(args, names, cluster, facade_shards, tmp_path):
    start = time.monotonic()
    result = cectl("train", *TINY, "--data", facade_shards, "--store", tmp_path, *args,
                   "--address", cluster[0], timeout=120)
    assert_refused(result, 2, *names)
    assert time.monotonic() - start < 60


def test_a_group_of_one_worker_trains_its_networks_without_ddp():
    from cectl.distributed import ddp_wrapper

    network = torch.nn.Linear(2, 2)
    assert ddp_wrapper(torch.device("cpu"), "fp32", world=1)(network) is network


def test_without_an_address_ray_starts_a_local_instance_not_a_recorded_cluster(monkeypatch):
    import ray

    from cectl.cluster import connect

    joined = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # connect sets it: undone after
    monkeypatch.setattr(ray, "init", lambda **options: joined.append(options["address"]))
    connect(None)  # as train --nodes, sweep and probe --nodes do without --address
    assert joined == ["local"]
