"""The loader: a data position that holds whatever the world size, a global batch policy,
and the shard cache that loader processes on one machine share."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import tempfile
import threading
import time

import pytest
import torch
from helpers import assert_refused, tiny_job, train_keys

from cectl.data import SAMPLE_LOG, TrainLoader
from cectl.errors import BadInput
from cectl.shard_format import open_manifest
from cectl.storage import open_store


def consume(shards: str, worlds: list[tuple[int, int]], log, *overrides: str) -> dict[int, str]:
    """Run loaders through phases of (world, steps), restoring rank 0's position between
    phases as a resize does; the sample key at each global position consumed."""
    manifest, position = open_manifest(shards), {"samples": 0}
    for world, steps in worlds:
        cfg = tiny_job(shards, *overrides)
        loaders = [TrainLoader(shards, manifest, cfg, rank, world) for rank in range(world)]
        for loader in loaders:
            loader.load_state_dict(position)
        for _ in range(steps):
            for loader in loaders:
                next(loader)
        position = loaders[0].state_dict()
        assert all(loader.state_dict() == position for loader in loaders)
    by_position: dict[int, str] = {}
    for line in log.read_text().splitlines():
        batch = json.loads(line)
        for i, key in enumerate(batch["keys"]):
            assert batch["position"] + i not in by_position, "a position consumed twice"
            by_position[batch["position"] + i] = key
    assert sorted(by_position) == list(range(position["samples"]))
    return by_position


def test_a_world_going_2_1_3_consumes_every_sample_of_the_epoch_once(facade_shards, tmp_path,
                                                                      monkeypatch):
    keys = train_keys(facade_shards)
    monkeypatch.setenv(SAMPLE_LOG, str(tmp_path / "elastic.jsonl"))
    # Batches of 8: 2 x 2 steps, 1 x 3, then 3 x 3 is 104 samples, past one epoch.
    elastic = consume(facade_shards, [(2, 2), (1, 3), (3, 3)], tmp_path / "elastic.jsonl")
    epoch = [elastic[p] for p in range(len(keys))]
    assert sorted(epoch) == sorted(keys)  # each once: none repeated, none skipped
    monkeypatch.setenv(SAMPLE_LOG, str(tmp_path / "fixed.jsonl"))
    fixed = consume(facade_shards, [(2, 7)], tmp_path / "fixed.jsonl", "data.workers=2")
    assert [fixed[p] for p in range(len(keys))] == epoch  # the same order, not just the set


def test_a_sample_gets_the_same_crop_whatever_the_world(facade_shards):
    manifest = open_manifest(facade_shards)
    cfg = tiny_job(facade_shards, "data.workers=2")
    alone = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    (first, _), (second, _) = next(alone), next(alone)
    pair = [TrainLoader(facade_shards, manifest, cfg, rank, 2) for rank in range(2)]
    assert torch.equal(next(pair[0])[0], first) and torch.equal(next(pair[1])[0], second)


@pytest.mark.parametrize("kind", ["random-block", "random-region"])
def test_a_sample_gets_the_same_hole_whatever_the_world(facade_shards, kind):
    from cectl.masks import holes_for_positions

    manifest = open_manifest(facade_shards)
    cfg = tiny_job(facade_shards, "data.batch_policy=global", "data.batch_size=16",
                   f"mask.kind={kind}", "data.workers=2")
    alone = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    _, whole = next(alone)  # drawn in a loader process
    assert torch.equal(whole, holes_for_positions(kind, alone.positions, 32, 2, 0))
    parts = [next(TrainLoader(facade_shards, manifest, cfg, rank, 3))[1] for rank in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole[0], whole[1])


def test_a_per_worker_position_converts_only_on_its_world(facade_shards):
    manifest, cfg = open_manifest(facade_shards), tiny_job(facade_shards)
    loader = TrainLoader(facade_shards, manifest, cfg, 0, 2)
    loader.load_state_dict({"batches": 3, "world": 2})
    assert loader.state_dict() == {"samples": 3 * 2 * 8}
    with pytest.raises(BadInput) as caught:
        loader.load_state_dict({"batches": 3, "world": 1})
    assert_refused(caught.value, 2, "data position", "for 1 workers, not 2")


def test_a_global_batch_is_the_same_images_whatever_the_world(facade_shards):
    manifest = open_manifest(facade_shards)
    cfg = tiny_job(facade_shards, "data.batch_policy=global", "data.batch_size=16")
    whole, _ = next(TrainLoader(facade_shards, manifest, cfg, 0, 1))
    for world, shares in ((2, [8, 8]), (3, [6, 5, 5])):
        parts = [next(TrainLoader(facade_shards, manifest, cfg, rank, world))[0]
                 for rank in range(world)]
        assert [len(p) for p in parts] == shares
        assert torch.equal(torch.cat(parts), whole)


def test_the_next_batch_is_decoded_off_the_training_thread_while_a_step_runs(facade_shards):
    loader = TrainLoader(facade_shards, open_manifest(facade_shards),
                         tiny_job(facade_shards, "data.workers=1"), 0, 1, gpu_jpegs=True)
    threads, unpack = [], loader.unpacker.unpack

    def watched(batch):
        threads.append(threading.current_thread())
        return unpack(batch)

    loader.unpacker.unpack = watched
    next(loader)
    deadline = time.monotonic() + 60
    while len(threads) < 2 and time.monotonic() < deadline:  # no second call needed
        time.sleep(0.05)
    assert len(threads) == 2
    assert threading.current_thread() not in threads


def test_a_restored_position_drops_the_batch_made_ready_ahead(facade_shards):
    loader = TrainLoader(facade_shards, open_manifest(facade_shards),
                         tiny_job(facade_shards, "data.workers=1"), 0, 1, gpu_jpegs=True)
    first, _ = next(loader)
    second, _ = next(loader)
    loader.load_state_dict({"samples": 0})
    again, _ = next(loader)
    assert not torch.equal(first, second)
    assert torch.equal(again, first)


def test_a_loader_without_processes_restored_again_and_again_keeps_no_shard_open(
        facade_shards):
    import gc
    import os

    def open_shards() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}").endswith(".tar")
                   for fd in os.listdir("/proc/self/fd"))

    before = open_shards()
    loader = TrainLoader(facade_shards, open_manifest(facade_shards),
                         tiny_job(facade_shards, "data.workers=0"), 0, 1)
    for _ in range(4):
        next(loader)
        next(loader)
        loader.load_state_dict({"samples": 0})
    gc.collect()
    assert open_shards() == before


def test_a_global_batch_smaller_than_the_world_is_refused(facade_shards):
    cfg = tiny_job(facade_shards, "data.batch_policy=global", "data.batch_size=2")
    with pytest.raises(BadInput) as caught:
        TrainLoader(facade_shards, open_manifest(facade_shards), cfg, 0, 3)
    assert_refused(caught.value, 2, "data.batch_size=2", "data.batch_policy=global", "3 workers")


@pytest.mark.parametrize("lock", ["shard", "claim"])
def test_a_process_forked_while_a_thread_holds_a_lock_does_not_keep_it(tmp_path, lock):
    """A shard's lock (held by the input thread of a loader without processes), and the
    local store's lock around a compare-and-swap (the claim's heartbeat thread), while the
    training thread forks loader processes."""
    import multiprocessing

    from cectl.locks import machine_lock
    from cectl.storage import LOCK_SUFFIX

    store = open_store(str(tmp_path / "store"))
    store.write_bytes("claim.json", b"{}")
    path = tmp_path / "shard.lock" if lock == "shard" else store.path("claim.json")
    locked = machine_lock if lock == "shard" else store._locked
    held, forked = threading.Event(), threading.Event()

    def holder() -> None:
        with locked(path):
            held.set()
            forked.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()  # a loader process started meanwhile
    forked.set()
    thread.join()
    lock_file = path if lock == "shard" else path.with_name(f".claim.json{LOCK_SUFFIX}")

    def free() -> bool:  # the child closes its copy as soon as it runs
        with open(lock_file) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

    try:
        deadline = time.monotonic() + 10
        while not free() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert free()
    finally:
        child.kill()
        child.join()


def test_the_shard_cache_keeps_the_newest_shards_and_those_in_use(bucket, tmp_path,
                                                                  monkeypatch):
    from cectl.shard_cache import ShardCache
    from cectl.shard_format import tar_writer

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(ShardCache, "KEEP", 2)
    store = open_store(f"s3://{bucket}/shards")
    shards = []
    for i in range(5):
        buf = io.BytesIO()
        with tar_writer(buf) as tar:
            tar.write({"__key__": f"s{i}", "jpg": bytes([i]) * 100})
        name = f"train/shard-{i:06d}.tar"
        store.write_bytes(name, buf.getvalue())
        shards.append({"name": name, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                       "bytes": len(buf.getvalue()), "samples": 1})
    cache = ShardCache(store)

    def fetch(i: int) -> None:
        time.sleep(0.02)  # past the file clock's tick: each fetch is newer than the last
        shard = cache.open(shards[i])
        try:
            assert shard.image(shard.entries[0]) == bytes([i]) * 100
        finally:
            shard.close()

    fetch(0)
    with open(cache.folder / f"{shards[0]['sha256']}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # held, as by a loader process opening it
        for i in range(1, 5):
            fetch(i)
    cached = sorted(p.stem for p in cache.folder.glob("*.tar"))
    # Shards 3 and 4 are the newest two; shard 0 was in use when it was due to go.
    assert cached == sorted(shards[i]["sha256"] for i in (0, 3, 4))
    fetch(1)  # dropped, so fetched again; shard 0, no longer held, goes
    assert sorted(p.stem for p in cache.folder.glob("*.tar")) == sorted(
        shards[i]["sha256"] for i in (1, 4))
    # What a loader process killed while fetching shard 2 left goes when it is fetched again.
    stale = cache.folder / f".{shards[2]['sha256']}.part.partial-123-abcd1234"
    stale.write_bytes(b"x" * 50)
    fetch(2)
    assert not stale.exists()


def test_old_cache_files_are_dropped_unless_in_use_or_already_gone(tmp_path):
    import os

    from cectl.locks import beyond_newest, machine_lock

    for age, name in enumerate(["e", "d", "c", "b", "a"]):  # "a" the oldest
        (tmp_path / f"{name}.tar").write_bytes(b"")
        os.utime(tmp_path / f"{name}.tar", (1000 - age, 1000 - age))
    (tmp_path / "gone.tar").symlink_to(tmp_path / "nowhere")  # removed by another process

    def lock_of(path):
        return path.with_suffix(".lock")

    with machine_lock(lock_of(tmp_path / "b.tar")):  # in use
        dropped = [path.name for path in beyond_newest(tmp_path, "*.tar", 2, lock_of)]
    assert dropped == ["a.tar", "c.tar"]
