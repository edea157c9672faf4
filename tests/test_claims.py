"""One writer per run across hosts: conditional heartbeats and takeovers, a holder that
finds its run taken over and stops, a Ray driver that holds the run for its workers, and
servers that ignore conditional writes. Each refusal is one sentence; nothing is written."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    TINY,
    HeaderStrippingProxy,
    Result,
    assert_refused,
    cectl_process,
    train_workers,
    wait_for,
)

from cectl.errors import BadInput, Failure
from cectl.runs import CLAIM, Run, read_state
from cectl.storage import open_store

# A heartbeat every 0.5 s and claims stale after 3 s, so that a test can pause a holder
# past staleness in seconds, not minutes.
FAST_CLAIMS = "import cectl.claims as c; c.HEARTBEAT_S, c.STALE_S = 0.5, 3.0"


@pytest.fixture(params=["local", "moto", pytest.param("seaweed", marks=pytest.mark.slow)])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("bucket" if request.param == "moto" else "seaweed_bucket")
    return f"s3://{bucket}/store"


def plant_claim(run: Run, **fields) -> None:
    """A claim of a process on another machine, as `fields` make it."""
    record = {"host": "elsewhere", "pid": 4242, "token": "theirs", "heartbeat": time.time()}
    run.store.write_bytes(CLAIM, json.dumps({**record, **fields}).encode())


def stored_claim(run: Run) -> dict:
    return json.loads(run.store.read_bytes(CLAIM))


def test_of_simultaneous_takeovers_of_a_dead_claim_exactly_one_wins(store_uri):
    for round in range(5):  # contenders 2 ms apart: one reads while another replaces
        run = Run(open_store(store_uri), f"stale-{round}")
        run.store.write_bytes("config.yaml", b"{}")
        plant_claim(run, heartbeat=time.time() - 3600)
        start, won = threading.Barrier(8), []

        def take_over(lag: float, name: str, start: threading.Barrier, won: list) -> None:
            start.wait()
            time.sleep(lag)
            with contextlib.suppress(BadInput):
                won.append(Run(open_store(store_uri), name).claim(resume=True))

        threads = [threading.Thread(target=take_over, args=(0.002 * i, run.name, start, won))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1
        assert stored_claim(run)["token"] == won[0].record["token"]
        won[0].release()
        assert not run.store.exists(CLAIM)


def test_heartbeats_renew_the_claim_conditionally_on_every_store(store_uri):
    run = Run(open_store(store_uri), "beating")
    held = run.claim(resume=False)
    first = stored_claim(run)["heartbeat"]
    for _ in range(2):  # each beat is conditional on the version the previous one wrote
        held._renew()
    assert held.lost is None and stored_claim(run)["heartbeat"] > first
    run.check_claim()
    held.release()
    assert not run.store.exists(CLAIM)


def test_a_heartbeat_never_overwrites_a_takeover_and_the_holder_stops(tmp_path):
    run = Run(open_store(str(tmp_path)), "r")
    held = run.claim(resume=False)
    run.store.write_bytes("config.yaml", b"{}")
    plant_claim(run, **held.record, heartbeat=time.time() - 3600)  # its beats stopped an hour
    taker = Run(open_store(str(tmp_path)), "r").claim(resume=True)
    held._renew()  # the holder's next heartbeat
    assert stored_claim(run)["token"] == taker.record["token"]
    with pytest.raises(Failure) as caught:
        run.check_claim(read=False)
    assert_refused(caught.value, 1, "'r'", f"taken over by process {os.getpid()}")
    held.release()  # leaves the taker's claim alone
    assert stored_claim(run)["token"] == taker.record["token"]
    taker.release()


@pytest.mark.parametrize("heartbeat", [time.time() + 10**9, float("inf"), "soon"])
def test_a_claim_with_a_future_or_odd_heartbeat_can_be_taken_over(heartbeat, tmp_path):
    run = Run(open_store(str(tmp_path)), "future")
    run.store.write_bytes("config.yaml", b"{}")
    plant_claim(run, heartbeat=heartbeat)
    run.claim(resume=True).release()


def test_a_dead_claim_with_this_process_pid_is_taken_over_and_a_held_one_is_not(tmp_path):
    """A container restarted in place runs its training under the same pid again."""
    import socket

    run = Run(open_store(str(tmp_path)), "restarted")
    run.store.write_bytes("config.yaml", b"{}")
    plant_claim(run, host=socket.gethostname(), pid=os.getpid(), token="before-the-restart")
    held = run.claim(resume=True)
    try:
        with pytest.raises(BadInput):
            Run(open_store(str(tmp_path)), "restarted").claim(resume=True)
    finally:
        held.release()


def test_deeply_nested_claim_and_state_json_are_damaged_files_not_crashes(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    run = Run(open_store(str(tmp_path)), "deep")
    run.store.write_bytes("config.yaml", b"{}")
    run.store.write_bytes(CLAIM, deep)
    run.claim(resume=True).release()  # unreadable: a dead process's, taken over

    ckpt = open_store(str(tmp_path / "ckpt"))
    ckpt.write_bytes("state.json", b'{"format": "cectl-checkpoint/2", "config": ' + deep + b"}")
    with pytest.raises(BadInput) as caught:
        read_state(ckpt)
    assert_refused(caught.value, 2, "state.json is corrupt")
    config = {"model": {}}
    for _ in range(500):  # parses, but no config is nested like this
        config = {"a": config}
    state = {"format": "cectl-checkpoint/2", "step": 1, "data_position": {"samples": 8},
             "config": {"model": config}}
    ckpt.write_bytes("state.json", json.dumps(state).encode())
    with pytest.raises(BadInput) as caught:
        read_state(ckpt)
    assert_refused(caught.value, 2, "state.json", "nested too deeply")


@pytest.mark.parametrize(("header", "method"), [("If-None-Match", "PUT"), ("If-Match", "PUT"),
                                                ("If-Match", "DELETE")])
def test_a_server_that_ignores_conditional_writes_is_refused_before_any_claim(
        header, method, facade_shards, s3_env, bucket, cli):
    proxy = HeaderStrippingProxy(int(s3_env.rsplit(":", 1)[1]), header, method)
    store = f"s3://{bucket}/store"
    refusal = cli("train", *TINY, "train.steps=2", "--data", facade_shards, "--store", store,
                  "--name", "r", env={"AWS_ENDPOINT_URL": proxy.url})
    assert_refused(refusal, 2, proxy.url, f"ignores {header} on {method}")
    assert proxy.stripped > 0
    assert open_store(store).list() == []  # no claim, no run, no leftover probe


@pytest.mark.slow
def test_a_paused_holder_finds_its_run_taken_over_and_stops(facade_shards, tmp_path):
    store = tmp_path / "store"
    run = Run(open_store(str(store)), "paused")

    def train(*args: str) -> subprocess.Popen:
        return cectl_process("train", *args, "--store", store, "--name", "paused",
                             setup=FAST_CLAIMS)

    holder = train(*TINY, "train.steps=100000", "train.checkpoint_every=10",
                   "--data", facade_shards)
    taker = None
    try:
        wait_for(lambda: run.steps(), holder)
        holder.send_signal(signal.SIGSTOP)  # a long GC pause, a partitioned host
        time.sleep(3.5)
        taker = train("--resume")
        wait_for(lambda: stored_claim(run).get("pid") == taker.pid, taker)
        holder.send_signal(signal.SIGCONT)
        out, err = holder.communicate(timeout=60)
        assert_refused(Result(holder.returncode, out, err), 1, f"taken over by process {taker.pid}")
        assert stored_claim(run)["pid"] == taker.pid  # its heartbeat did not write it back
        assert taker.poll() is None  # the run goes on, with one writer
        taker.send_signal(signal.SIGINT)
        _, err = taker.communicate(timeout=60)
        assert taker.returncode == 130, err
        assert not run.store.exists(CLAIM)
    finally:
        for process in (holder, taker):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()


@pytest.mark.slow
def test_a_ray_run_is_held_by_its_driver_and_survives_a_new_rank_0_on_another_host(
        facade_shards, tmp_path):
    # Every process reports a host of its own, as if each worker ran on another machine:
    # a claim taken by a rank 0 would be refused to the next one (its heartbeat is fresh).
    fake = tmp_path / "fakehost"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import os, socket\nsocket.gethostname = lambda: f'host-{os.getpid()}'\n")
    # `ray start` last recorded a cluster nobody answers at: a run without --address must
    # start its own local instance, not join that one. (A short folder: Ray's sockets.)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    path = [str(fake), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(path)}
    env.pop("RAY_ADDRESS", None)
    store = tmp_path / "store"
    run = Run(open_store(str(store)), "driven")
    job = subprocess.Popen(
        [sys.executable, "-m", "cectl", "train", *TINY, "train.steps=30",
         "train.checkpoint_every=10", "--data", facade_shards, "--store", str(store),
         "--name", "driven", "--nodes", "1", "--cpu", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: run.steps(), job, timeout=300)
        holder = stored_claim(run)["host"]
        workers = train_workers(job.pid)  # the driver started this Ray instance
        assert workers, "no Ray Train worker below the driver"
        os.kill(workers[0], signal.SIGKILL)
        out, err = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    assert job.returncode == 0, err  # not "training failed after 3 restarts"
    summary = json.loads(out)
    assert summary["step"] == 30 and summary["resumes"] >= 1
    assert holder == f"host-{job.pid}"  # the driver's claim, not a worker's
    assert not run.store.exists(CLAIM)
