"""The cost of a resize: seconds from a node's death to the first step of the smaller
group, and from a node's return to the first step of the larger one.

A local cluster of three one-CPU nodes (`cectl cluster local`) runs `cectl train --nodes
2:3 --cpu` on a tiny model, checkpointing every 10 steps. Once step 10 is stored, one
node dies as a preempted machine does (SIGKILL of its raylet and everything it started;
the test suite's helper). Once the 2-worker group trains, a node joins (`cectl cluster
local --join`). Measured from the kill: the first batch the 2-worker group draws (from
the sample log); from the join: the first batch of the 3-worker group (Ray looks for
nodes every `train.resize_check_s`, 30 s by default); also how many steps were redone.

    .venv/bin/python bench/elastic.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from cectl.config import load_config
from cectl.data import SAMPLE_LOG
from cectl.demo import make_facades
from cectl.schema import ShardConfig
from cectl.shard import run_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TINY, joined_nodes, kill_a_training_node, local_cluster  # noqa: E402

STEPS = 3000  # long enough for the 2-worker group to outlast a resize check


def batches(log: Path) -> list[dict]:
    """The batches in the sample log (not the final weight digests)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [b for b in map(json.loads, lines) if "keys" in b]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="cectl-bench-elastic-"))
    make_facades(root / "images", 96, size=72)
    run_shard(str(root / "images"), str(root / "shards"),
              load_config(ShardConfig, flags={"shard_size": 16, "val_fraction": 0.15}),
              Console(quiet=True))
    log, store = root / "samples.jsonl", root / "store"
    with local_cluster(3, cpus=1) as (address, cluster_pid):
        job = subprocess.Popen(
            [sys.executable, "-m", "cectl", "train", *TINY, f"train.steps={STEPS}",
             "train.checkpoint_every=10", "--data", str(root / "shards"), "--store",
             str(store), "--name", "elastic", "--nodes", "2:3", "--cpu", "--address", address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "COLUMNS": "200", SAMPLE_LOG: str(log)})
        marker = store / "runs/elastic/checkpoints/step-000010/state.json"
        while not marker.exists():
            if job.poll() is not None:
                sys.exit(f"the run ended before step 10:\n{job.stderr.read()}")
            time.sleep(0.05)
        kill_a_training_node(cluster_pid)
        killed = time.monotonic()
        # Steps the 3-worker group had drawn (global batches of 3 x 8 samples).
        done_before = max(b["position"] for b in batches(log)) // 24 + 1
        shrunk = wait_for_world(job, log, 2) - killed
        with joined_nodes(address, 1):
            joined = time.monotonic()
            grown = wait_for_world(job, log, 3) - joined
            _, err = job.communicate()
    if job.returncode:
        sys.exit(f"the run failed:\n{err}")
    print(json.dumps({"kill_to_first_step_of_2_workers_s": round(shrunk, 1),
                      "join_to_first_step_of_3_workers_s": round(grown, 1),
                      "steps_drawn_by_3_workers_before_the_kill": done_before,
                      "steps_redone_after_the_kill": done_before - 10}))


def wait_for_world(job: subprocess.Popen, log: Path, world: int) -> float:
    """When the sample log first shows a batch of a group of `world` after the last one."""
    seen = len(batches(log))
    while not any(b["world"] == world for b in batches(log)[seen:]):
        if job.poll() is not None:
            sys.exit(f"the run ended before a group of {world}:\n{job.stderr.read()}")
        time.sleep(0.05)
    return time.monotonic()


if __name__ == "__main__":
    main()
