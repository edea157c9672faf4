"""`cectl shard`: images to WebDataset tar shards plus a manifest, in parallel and resumable.

The plan is fixed before any work starts: inputs are listed, split, shuffled with the
seed and cut into chunks of `shard_size`; shard i of a split holds chunk i (minus skipped
inputs). So every shard can be built independently, by any worker, in any order, and a
re-run rebuilds exactly the shards that have no finished record, and deletes the shards
(and records) of an earlier plan that this one lacks. The format itself (tar members,
manifest) is `cectl.shard_format`'s.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import re
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import IO, Any

from omegaconf import DictConfig
from rich.console import Console

from cectl.errors import BadInput
from cectl.images import Skip, prepare_sample
from cectl.render import item_progress, status, warning
from cectl.shard_format import FORMAT, MANIFEST, SPLITS, tar_writer
from cectl.sources import Item, list_items
from cectl.storage import Store, is_partial, open_store, safe_key

RECORDS = ".cectl-records"  # one JSON per finished shard: what a re-run may keep
SHARD_NAME = re.compile(rf"({'|'.join(SPLITS)})/shard-\d{{6}}\.tar")


@dataclass
class ShardTask:
    split: str
    index: int
    items: list[Item]
    fingerprint: str  # of the recipe parameters and the exact inputs

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"


def recipe_params(cfg: DictConfig) -> dict[str, Any]:
    """The parameters that decide the bytes of the shards (workers do not)."""
    keys = ("layout", "resize", "quality", "shard_size", "val_fraction", "min_size", "seed",
            "label_from")
    return {k: cfg[k] for k in keys}


def plan(items: list[Item], params: dict[str, Any]) -> list[ShardTask]:
    tasks = []
    for split in SPLITS:
        chosen = [item for item in items if item.split == split]
        # Shuffle so that a shard mixes classes instead of holding one wnid folder.
        random.Random(params["seed"]).shuffle(chosen)
        for index, start in enumerate(range(0, len(chosen), params["shard_size"])):
            chunk = chosen[start : start + params["shard_size"]]
            blob = json.dumps([params, [asdict(item) for item in chunk]], sort_keys=True)
            tasks.append(ShardTask(split, index, chunk, hashlib.sha256(blob.encode()).hexdigest()))
    return tasks


def _read_input(src: Store, key: str) -> bytes:
    if not safe_key(key):  # an S3 name such as 'imgs//a.png' or 'imgs/../a.png'
        raise Skip("unreadable", "its name leaves the source folder")
    try:
        return src.read_bytes(key)
    except FileNotFoundError:
        if (path := src.local_path(key)) is not None and path.is_symlink():
            raise Skip("broken-symlink") from None
        raise Skip("unreadable", "vanished while sharding") from None
    except OSError as e:
        raise Skip("unreadable", e.strerror or str(e)) from None
    except BadInput:  # S3's missing object; any other refusal (credentials) is the store's
        if src.exists(key):
            raise
        raise Skip("unreadable", "vanished while sharding") from None


_progress_queue = None  # set in each worker process


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


class _HashingWriter:
    """A write-only stream over a file that counts and hashes what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def write_shard(src_uri: str, dst_uri: str, task: ShardTask, params: dict[str, Any]) -> dict:
    """Build one shard and publish it atomically (hashed as it is written); its record."""
    src, dst = open_store(src_uri), open_store(dst_uri)
    skipped, samples = [], 0
    stream: _HashingWriter | None = None

    def write(path) -> None:
        nonlocal stream, samples
        with open(path, "wb") as f:
            stream = _HashingWriter(f)
            with tar_writer(stream) as tar:
                for item in task.items:
                    try:
                        data = _read_input(src, item.source)
                        payload, ext, size = prepare_sample(
                            data, params["resize"], params["quality"], params["min_size"])
                    except Skip as e:
                        skipped.append({"path": item.source, "reason": e.reason,
                                        "detail": str(e)})
                    else:
                        meta = {"source": item.source, **size, "label": item.label}
                        tar.write({"__key__": item.key, ext: payload,
                                   "json": json.dumps(meta, sort_keys=True).encode()})
                        samples += 1
                    if _progress_queue is not None:
                        _progress_queue.put(1)

    dst.write_file(task.name, write)
    return {"name": task.name, "samples": samples, "bytes": stream.size,
            "sha256": stream.sha.hexdigest(), "fingerprint": task.fingerprint,
            "skipped": skipped}


def _load_records(dst: Store, existing: set[str]) -> dict[str, dict]:
    records = {}
    for key in existing:
        if key.startswith(f"{RECORDS}/") and key.endswith(".json"):
            record = json.loads(dst.read_bytes(key))
            if record.get("name") in existing:
                records[record["name"]] = record
    return records


def _open_stores(src_uri: str, dst_uri: str) -> tuple[Store, Store]:
    src, dst = open_store(src_uri), open_store(dst_uri)
    if (root := src.local_path("")) is not None and not root.is_dir():
        raise BadInput(f"source folder {root} does not exist: give the folder "
                       "that holds the images")
    src.check()
    dst.check(create=True)
    return src, dst


def _left_over(key: str, planned: set[str]) -> bool:
    """Whether `key` is a shard, or a shard's record, of an earlier plan that this one
    lacks (a re-run with another shard size or split makes fewer or other shards)."""
    name = key
    if key.startswith(f"{RECORDS}/"):
        name = key[len(RECORDS) + 1 :].removesuffix(".json") + ".tar"
    return SHARD_NAME.fullmatch(name) is not None and name not in planned


def build_manifest(source: str, layout: str, params: dict, tasks: list[ShardTask],
                   records: dict[str, dict]) -> dict:
    splits, skipped = {}, []
    for split in SPLITS:
        shards = [records[t.name] for t in tasks if t.split == split]
        if not shards:
            continue
        splits[split] = {
            "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in shards],
            "samples": sum(r["samples"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
        }
        skipped += [s for r in shards for s in r["skipped"]]
    skipped.sort(key=lambda s: s["path"])
    return {
        "format": FORMAT,
        "source": source,
        "layout": layout,
        "recipe": params,
        "splits": splits,
        "totals": {
            "samples": sum(s["samples"] for s in splits.values()),
            "shards": sum(len(s["shards"]) for s in splits.values()),
            "bytes": sum(s["bytes"] for s in splits.values()),
        },
        "skipped": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_inputs": [{"path": s["path"], "reason": s["reason"]} for s in skipped],
    }


def run_shard(src_uri: str, dst_uri: str, cfg: DictConfig, console: Console) -> dict:
    """Shard SRC into DST; returns the manifest plus this run's `stats`."""
    start = time.perf_counter()
    src, dst = _open_stores(src_uri, dst_uri)
    with status(console, f"listing {src.uri}"):
        layout, items = list_items(src.list(), cfg.layout, cfg.val_fraction, src.uri,
                                   cfg.label_from)
    params = {**recipe_params(cfg), "layout": layout}
    tasks = plan(items, params)
    existing = set(dst.list())
    records = _load_records(dst, existing)
    todo = [t for t in tasks if records.get(t.name, {}).get("fingerprint") != t.fingerprint]
    kept = len(tasks) - len(todo)
    if kept:
        console.print(f"resuming: {kept} of {len(tasks)} shards already finished")

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    todo_names = {t.name for t in todo}
    done_images = sum(len(t.items) for t in tasks if t.name not in todo_names)
    with item_progress(console) as progress, ProcessPoolExecutor(
        max_workers=max(1, min(cfg.workers, len(todo))), mp_context=ctx,
        initializer=_init_worker, initargs=(queue,),
    ) as pool:
        bar = progress.add_task("sharding", total=len(items), completed=done_images)
        pending = {pool.submit(write_shard, src.uri, dst.uri, t, params): t for t in todo}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    progress.advance(bar, queue.get())
                for future in finished:
                    record = future.result()
                    del pending[future]
                    record_key = f"{RECORDS}/{record['name'].removesuffix('.tar')}.json"
                    dst.write_bytes(record_key, json.dumps(record, sort_keys=True).encode())
                    records[record["name"]] = record
                    for s in record["skipped"]:
                        warning(console, "skipped", f"{s['path']}: {s['detail']}")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        progress.update(bar, completed=len(items))

    manifest = build_manifest(src.uri, layout, params, tasks, records)
    dst.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    planned = {t.name for t in tasks}
    for key in existing:
        if is_partial(key) or _left_over(key, planned):
            dst.delete(key)
    elapsed = time.perf_counter() - start
    processed = sum(len(t.items) for t in todo)
    manifest["stats"] = {"seconds": elapsed, "processed": processed, "kept_shards": kept,
                         "images_per_s": processed / elapsed if elapsed else 0.0}
    return manifest


