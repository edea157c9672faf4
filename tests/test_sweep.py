"""`cectl sweep`: Ray Tune trials through the same training loop, resumable."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import TINY, cectl

pytestmark = pytest.mark.slow  # Ray Tune trials: minutes (the space's parsing is test_config's)

SWEEP = """\
job: demo
metric: val_l2_pct
mode: min
samples: 4
grace_steps: 2
reduction_factor: 2
space:
  optim.lr_ratio: uniform(1, 30)
  loss.lambda_adv: loguniform(1e-4, 1e-1)
"""


class Planted:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def sweep_args(tmp_path, facade_shards) -> list[str]:
    (tmp_path / "tiny-sweep.yaml").write_text(SWEEP)
    return ["sweep", tmp_path / "tiny-sweep.yaml", *TINY, "train.steps=6", "train.eval_every=2",
            "--data", facade_shards, "--store", tmp_path / "store", "--cpu"]


def test_a_sweep_of_four_trials_stores_a_best_config_that_trains(tmp_path, facade_shards,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cectl(*sweep_args(tmp_path, facade_shards), "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["trials"]) == 4 and report["metric"] == "val_l2_pct"
    metrics = [t["metric"] for t in report["trials"] if t["metric"] is not None]
    assert metrics == sorted(metrics)
    best = tmp_path / "store" / "sweeps" / "tiny-sweep-best.yaml"
    assert report["best"] == str(best) and not list(tmp_path.glob("*-best.yaml"))
    cfg = yaml.safe_load(best.read_text())
    assert cfg["loss"]["lambda_rec"] == 1 - cfg["loss"]["lambda_adv"]
    assert 1 <= cfg["optim"]["lr_ratio"] <= 30 and cfg["data"]["uri"] == facade_shards
    trained = cectl("train", best, "--local", "--store", tmp_path / "store", "--name", "best",
                    "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["step"] == 6


def test_an_interrupted_sweep_resumes_with_the_same_command(tmp_path, facade_shards,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in sweep_args(tmp_path, facade_shards)]
    first = subprocess.Popen([sys.executable, "-m", "cectl", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "store" / "runs"
    deadline = time.monotonic() + 300
    while (time.monotonic() < deadline and first.poll() is None
           and not list(runs.glob("*/config.yaml"))):
        time.sleep(0.1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    first.send_signal(signal.SIGINT)  # Ctrl-C, once the first trial is training
    first.communicate(timeout=120)
    assert first.returncode == 130
    best = tmp_path / "store" / "sweeps" / "tiny-sweep-best.yaml"
    assert not best.exists()
    # Tune's own state is never read back: a planted pickle there must not run.
    marker = tmp_path / "unpickled"
    (tmp_path / "store" / "sweeps" / "tiny-sweep" / "tuner.pkl").write_bytes(
        pickle.dumps(Planted(marker)))

    again = cectl(*args, "--output", tmp_path / "best.yaml", "--json", timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming sweep tiny-sweep" in again.stderr
    report = json.loads(again.stdout)
    assert len(report["trials"]) == 4 and not marker.exists()
    assert sorted(p.name for p in runs.iterdir()) == [f"tiny-sweep-{i:03d}" for i in range(4)]
    assert best.exists() and (tmp_path / "best.yaml").read_text() == best.read_text()
