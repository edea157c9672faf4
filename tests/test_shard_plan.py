"""The shard plan, its fingerprints, shard records and the manifest, in-process."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from dataclasses import replace

import pytest
from helpers import image_bytes

from cectl.config import load_config
from cectl.schema import ShardConfig
from cectl.shard import RECORDS, _load_records, build_manifest, plan, recipe_params, write_shard
from cectl.shard_format import read_samples
from cectl.sources import Item
from cectl.storage import open_store

PARAMS = {**recipe_params(load_config(ShardConfig)), "layout": "folder", "shard_size": 4}


def items(n: int, val: int = 0) -> list[Item]:
    return [Item(f"img{i:03d}", f"img{i:03d}.jpg", "val" if i < val else "train", None)
            for i in range(n)]


def test_plan_cuts_each_split_into_shards_holding_every_item_once():
    tasks = plan(items(11, val=3), PARAMS)
    assert [t.name for t in tasks] == ["train/shard-000000.tar", "train/shard-000001.tar",
                                       "val/shard-000000.tar"]
    assert [len(t.items) for t in tasks] == [4, 4, 3]
    assert sorted(i.key for t in tasks for i in t.items) == [i.key for i in items(11)]
    assert all(i.split == t.split for t in tasks for i in t.items)


def test_plan_is_the_same_for_the_same_inputs_and_mixes_them_by_seed():
    first, again = plan(items(12), PARAMS), plan(items(12), PARAMS)
    assert [(t.items, t.fingerprint) for t in first] == [(t.items, t.fingerprint) for t in again]
    reseeded = plan(items(12), {**PARAMS, "seed": 1})
    assert [t.items for t in reseeded] != [t.items for t in first]
    assert [i.key for i in first[0].items] != [i.key for i in items(4)]  # shuffled


@pytest.mark.parametrize(("key", "value"), [("resize", 0), ("quality", 80), ("min_size", 32),
                                            ("seed", 7), ("layout", "paris"),
                                            ("val_fraction", 0.1)])
def test_every_recipe_parameter_changes_every_fingerprint(key, value):
    before = plan(items(8), PARAMS)
    after = plan(items(8), {**PARAMS, key: value})
    assert not {t.fingerprint for t in before} & {t.fingerprint for t in after}


@pytest.mark.parametrize("change", [{"label": "n01440764"}, {"source": "moved/img005.jpg"}])
def test_a_changed_input_changes_only_the_fingerprint_of_its_own_shard(change):
    before = plan(items(12), PARAMS)
    inputs = items(12)
    inputs[5] = replace(inputs[5], **change)
    after = plan(inputs, PARAMS)
    changed = [b.name for b, a in zip(before, after, strict=True) if b.fingerprint != a.fingerprint]
    assert changed == [next(t.name for t in after if inputs[5] in t.items)]


def jpeg(size: tuple[int, int] = (96, 80)) -> bytes:
    return image_bytes(size, "JPEG", (120, 40, 200))


@pytest.fixture
def source(tmp_path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"img{i:03d}.jpg").write_bytes(jpeg())
    (src / "img005.jpg").write_bytes(b"not an image")
    return str(src)


def test_shard_record_matches_the_bytes_written_and_names_skipped_inputs(source, tmp_path):
    task = plan(items(6), {**PARAMS, "shard_size": 6})[0]
    record = write_shard(source, str(tmp_path / "out"), task, PARAMS)
    data = (tmp_path / "out" / task.name).read_bytes()
    assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["fingerprint"] == task.fingerprint and record["samples"] == 5
    assert [(s["path"], s["reason"]) for s in record["skipped"]] == [("img005.jpg", "not-an-image")]
    samples = read_samples(open_store(str(tmp_path / "out")), task.name)
    assert [s["__key__"] for s in samples] == [i.key for i in task.items if i.key != "img005"]
    assert all(json.loads(s["json"])["width"] == 96 and s["jpg"][:2] == b"\xff\xd8"
               for s in samples)


def test_shard_bytes_depend_only_on_the_inputs_not_on_when_they_were_written(source, tmp_path):
    task = plan(items(5), PARAMS)[0]
    write_shard(source, str(tmp_path / "a"), task, PARAMS)
    # The clock past its next whole second (tar stores whole seconds), and the inputs
    # touched: a writer that let either time into the tar would now write other bytes.
    time.sleep(1.05 - time.time() % 1)
    for path in os.scandir(source):
        os.utime(path.path, (time.time() - 86400, time.time() - 86400))
    write_shard(source, str(tmp_path / "b"), task, PARAMS)
    assert (tmp_path / "a" / task.name).read_bytes() == (tmp_path / "b" / task.name).read_bytes()


def test_shard_members_carry_fixed_metadata_only(source, tmp_path):
    task = plan(items(2), PARAMS)[0]
    write_shard(source, str(tmp_path / "out"), task, PARAMS)
    with tarfile.open(tmp_path / "out" / task.name) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{i.key}.{ext}" for i in task.items
                                         for ext in ("jpg", "json")]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (0, 0o644, 0, 0, "", "")}


def test_long_and_non_ascii_keys_survive_the_tar(tmp_path):
    key = "façades/" + "x" * 120
    (tmp_path / "src" / "façades").mkdir(parents=True)
    (tmp_path / "src" / "façades" / "a.jpg").write_bytes(jpeg())
    task = plan([Item(key, "façades/a.jpg", "train", None)], PARAMS)[0]
    write_shard(str(tmp_path / "src"), str(tmp_path / "out"), task, PARAMS)
    [sample] = read_samples(open_store(str(tmp_path / "out")), task.name)
    assert sample["__key__"] == key and set(sample) >= {"jpg", "json"}


def test_only_records_of_shards_that_exist_are_kept(tmp_path):
    dst = open_store(str(tmp_path))
    for name in ("train/shard-000000", "train/shard-000001"):
        dst.write_bytes(f"{RECORDS}/{name}.json", json.dumps({"name": f"{name}.tar"}).encode())
    dst.write_bytes("train/shard-000000.tar", b"")
    records = _load_records(dst, set(dst.list()))
    assert list(records) == ["train/shard-000000.tar"]


def record(name: str, samples: int, skipped: list[tuple[str, str]] = ()) -> dict:
    return {"name": name, "samples": samples, "bytes": 100 * samples, "sha256": name[-5:],
            "fingerprint": "f", "skipped": [{"path": p, "reason": r, "detail": "d"}
                                            for p, r in skipped]}


@pytest.mark.parametrize("val", [0, 3])
def test_manifest_lists_shards_in_plan_order_with_totals_and_skips(val):
    tasks = plan(items(11, val=val), PARAMS)
    records = {t.name: record(t.name, len(t.items) - (t.index == 1),
                              [(f"z{t.index}.jpg", "corrupt")] * (t.index == 1))
               for t in reversed(tasks)}
    records["train/shard-000000.tar"]["skipped"] = [{"path": "a.jpg", "reason": "empty",
                                                     "detail": "d"}]
    manifest = build_manifest("/src", "folder", PARAMS, tasks, records)
    assert list(manifest["splits"]) == (["train", "val"] if val else ["train"])
    train = manifest["splits"]["train"]
    assert [s["name"] for s in train["shards"]] == [t.name for t in tasks if t.split == "train"]
    assert set(train["shards"][0]) == {"name", "samples", "bytes", "sha256"}
    assert manifest["totals"] == {"samples": 10, "shards": len(tasks), "bytes": 1000}
    assert manifest["skipped"] == {"corrupt": 1, "empty": 1}
    assert manifest["skipped_inputs"] == [{"path": "a.jpg", "reason": "empty"},
                                          {"path": "z1.jpg", "reason": "corrupt"}]
    assert manifest["recipe"] == PARAMS and manifest["format"] == "cectl-shards/1"
