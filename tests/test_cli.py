"""The command line: train's options that cannot work together, refused before anything
starts; and what only a real process shows: the entry point, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import TINY, assert_refused, cectl, free_port


def ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.mark.parametrize(("args", "names"), [
    (["--local", "--nodes", "2"], ["--local", "--nodes"]),
    (["--resume"], ["--resume", "--name"]),
    (["--resume", "--name", "ghost"], ["'ghost'"]),
    (["--name", "r", "train.grad_reduce=bf16", "--nodes", "1", "--cpu"],
     ["train.grad_reduce=bf16", "--cpu"]),
    (["--name", "r", "--nodes", "3:2", "--cpu"], ["--nodes 3:2", "MIN", "MAX"]),
    (["--name", "r", "--nodes", "two", "--cpu"], ["--nodes two", "MIN:MAX"]),
])
def test_train_refuses_options_that_cannot_work_before_starting_anything(
        args, names, cli, facade_shards, tmp_path):
    result = cli("train", *TINY, "--data", facade_shards, "--store", tmp_path / "store", *args)
    assert_refused(result, 2, *names)
    assert not (tmp_path / "store" / "runs").exists() and not ray_started()


@pytest.mark.parametrize("command", [["train", *TINY], ["sweep", "sweep-lambda-lr"]])
def test_missing_shards_are_refused_before_a_step_or_a_trial(command, cli, tmp_path):
    missing = tmp_path / "no-shards"
    result = cli(*command, "--data", missing, "--store", tmp_path / "store")
    assert_refused(result, 2, str(missing))
    assert len(result.stderr.strip().splitlines()) == 1  # the sentence alone: no progress
    assert not (tmp_path / "store" / "runs").exists() and not ray_started()


def test_an_address_with_no_cluster_is_refused(cli, facade_shards, tmp_path, monkeypatch):
    # Ray is told to stay on the loopback through the environment: undone after the test.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = f"127.0.0.1:{free_port()}"
    result = cli("train", *TINY, "--data", facade_shards, "--store", tmp_path, "--nodes", "2",
                 "--cpu", "--address", address)
    assert_refused(result, 2, address, "--address")
    assert not ray_started()


@pytest.mark.slow  # imports Ray in a process of its own
def test_joining_a_cluster_that_is_not_local_is_refused():
    # A process of its own: `cluster local` takes over SIGTERM to stop its nodes.
    result = cectl("cluster", "local", "--join", "10.1.2.3:6379", "--nodes", "1", timeout=60)
    assert_refused(result, 2, "--join", "10.1.2.3:6379", "127.0.0.1:PORT")


def test_the_entry_point_keeps_stdout_for_the_report(facade_shards, tmp_path):
    ok = cectl("verify", facade_shards)
    assert ok.returncode == 0, ok.stderr
    [report] = ok.stdout.strip().splitlines()  # the progress went to stderr
    assert facade_shards in report
    refused = cectl("verify", tmp_path)
    assert_refused(refused, 2, str(tmp_path / "manifest.json"))
    assert refused.stdout == ""


@pytest.mark.slow  # a signal to a real training process
def test_ctrl_c_stops_a_training_that_resumes_from_its_last_checkpoint(cli, facade_shards,
                                                                      tmp_path):
    args = ["train", *TINY, "train.steps=400", "train.checkpoint_every=5", "--local", "--data",
            facade_shards, "--store", tmp_path, "--name", "stopped"]
    job = subprocess.Popen([sys.executable, "-m", "cectl", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    run = tmp_path / "runs" / "stopped"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints/step-000005/state.json").exists() and job.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint in 120 s"
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: `cectl train --resume --name RUN`"), err
    assert "Traceback" not in err
    assert out == "" and not (run / "claim.json").exists()  # the run is free to resume
    # The last complete checkpoint (one cut short by the signal has no state.json).
    saved = max(int(p.parent.name.removeprefix("step-"))
                for p in (run / "checkpoints").glob("*/state.json"))

    resumed = cli("train", f"train.steps={saved + 3}", "--store", tmp_path, "--name", "stopped",
                  "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["step"], summary["resumes"]) == (saved + 3, 1)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss_rec" in m] == list(range(1, saved + 4))
    assert [m["step"] for m in lines if "resumed" in m] == [saved]
