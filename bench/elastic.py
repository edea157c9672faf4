"""The cost of a resize: seconds from a node's death to the first step of the smaller group.

A local cluster of three one-CPU nodes (`cectl cluster local`) runs `cectl train --nodes
2:3 --cpu` on a tiny model, checkpointing every 10 steps. Once step 10 is stored, one
node dies as a preempted machine does (SIGKILL of its raylet and everything it started;
the test suite's helper). Measured from the kill: the first batch the 2-worker group
draws (from the sample log), and the end of the run; also how many steps were redone.

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

from cectl.config import ShardConfig, load_config
from cectl.data import SAMPLE_LOG
from cectl.demo import make_facades
from cectl.shard import run_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TINY, kill_a_training_node, local_cluster  # noqa: E402

STEPS = 40


def batches(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


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
        while not any(b["world"] == 2 for b in batches(log)):
            if job.poll() is not None:
                sys.exit(f"the run ended without shrinking:\n{job.stderr.read()}")
            time.sleep(0.05)
        first_step = time.monotonic() - killed
        _, err = job.communicate()
        finished = time.monotonic() - killed
    if job.returncode:
        sys.exit(f"the run failed:\n{err}")
    print(json.dumps({"kill_to_first_step_of_2_workers_s": round(first_step, 1),
                      "kill_to_end_of_run_s": round(finished, 1),
                      "steps_drawn_by_3_workers": done_before,
                      "steps_redone": done_before - 10}))


if __name__ == "__main__":
    main()
