"""`cectl shard`: images to WebDataset tar shards plus a manifest, in parallel and resumable.

The plan is fixed before any work starts: inputs are listed, split, shuffled with the
seed and cut into chunks of `shard_size`; shard i of a split holds chunk i (minus skipped
inputs). So every shard can be built independently, by any worker, in any order, and a
re-run rebuilds exactly the shards that have no finished record.

Shards are written with webdataset's TarWriter and read back with its tar iterator, so
cectl, `cectl verify` and any WebDataset pipeline agree on what a sample is.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any

from omegaconf import DictConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cectl.errors import BadInput
from cectl.images import Skip, prepare_sample
from cectl.sources import Item, list_items
from cectl.storage import Store, is_partial, open_store, safe_key

if TYPE_CHECKING:
    import webdataset as wds

FORMAT = "cectl-shards/1"
MANIFEST = "manifest.json"
RECORDS = ".cectl-records"  # one JSON per finished shard: what a re-run may keep
SPLITS = ("train", "val")


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


def tar_writer(stream: IO[bytes]) -> wds.TarWriter:
    """A webdataset TarWriter whose output depends only on the samples written.

    Entries get fixed metadata (mtime 0, mode 0644, no user or group, ids 0) and PAX
    headers for long or non-ASCII keys; values are written as the bytes given (no encoder).
    """
    # Imported here: webdataset pulls in torch, which only the workers that write need.
    import webdataset as wds

    return wds.TarWriter(stream, encoder=False, mtime=0, mode=0o644, user="", group="",
                         format="PAX_FORMAT")


def tar_samples(stream: IO[bytes], name: str) -> Iterator[dict]:
    """The samples of one shard, raw bytes by extension, by webdataset's key rule."""
    import webdataset as wds

    files = ({**member, "__url__": name} for member in wds.tariterators.tar_file_iterator(stream))
    return wds.tariterators.group_by_keys(files)


def read_samples(store: Store, name: str, copy: IO[bytes] | None = None) -> list[dict]:
    """All samples of one shard (training and evaluation read through this), read from
    `copy` when given (a copy on this machine)."""
    try:
        with copy or store.open(name) as f:
            return list(tar_samples(f, name))
    except FileNotFoundError:
        raise BadInput(f"shard {store.url(name)} is missing: run `cectl verify`") from None
    except (tarfile.TarError, ValueError) as e:
        raise BadInput(f"shard {store.url(name)} is not a readable tar ({e}): run "
                       "`cectl verify`") from None


def _read_input(src: Store, key: str) -> bytes:
    try:
        return src.read_bytes(key)
    except FileNotFoundError:
        if (path := src.local_path(key)) is not None and path.is_symlink():
            raise Skip("broken-symlink") from None
        raise Skip("unreadable", "vanished while sharding") from None
    except OSError as e:
        raise Skip("unreadable", e.strerror or str(e)) from None


_progress_queue = None  # set in each worker process


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def write_shard(src_uri: str, dst_uri: str, task: ShardTask, params: dict[str, Any]) -> dict:
    """Build one shard in a local temp file, then publish it atomically; returns its record."""
    src, dst = open_store(src_uri), open_store(dst_uri)
    skipped, samples = [], 0
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        with tar_writer(tmp) as tar:
            for item in task.items:
                try:
                    data = _read_input(src, item.source)
                    payload, ext, size = prepare_sample(
                        data, params["resize"], params["quality"], params["min_size"])
                except Skip as e:
                    skipped.append({"path": item.source, "reason": e.reason, "detail": str(e)})
                else:
                    meta = {"source": item.source, **size, "label": item.label}
                    tar.write({"__key__": item.key, ext: payload,
                               "json": json.dumps(meta, sort_keys=True).encode()})
                    samples += 1
                if _progress_queue is not None:
                    _progress_queue.put(1)
        tmp.flush()
        sha, size_bytes = hashlib.sha256(), 0
        with open(tmp.name, "rb") as f:
            while block := f.read(2**20):
                sha.update(block)
                size_bytes += len(block)
        dst.put_file(tmp.name, task.name)
    return {"name": task.name, "samples": samples, "bytes": size_bytes,
            "sha256": sha.hexdigest(), "fingerprint": task.fingerprint, "skipped": skipped}


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} img/s", style="progress.data.speed")


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(), TimeRemainingColumn(), console=console)


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
    with console.status(f"listing {src.uri}"):
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
    with make_progress(console) as progress, ProcessPoolExecutor(
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
                        console.print(f"[yellow]skipped[/] {s['path']}: {s['detail']}")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        progress.update(bar, completed=len(items))

    manifest = build_manifest(src.uri, layout, params, tasks, records)
    dst.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    for key in existing:
        if is_partial(key):
            dst.delete(key)
    elapsed = time.perf_counter() - start
    processed = sum(len(t.items) for t in todo)
    manifest["stats"] = {"seconds": elapsed, "processed": processed, "kept_shards": kept,
                         "images_per_s": processed / elapsed if elapsed else 0.0}
    return manifest


def shard_names(manifest: dict) -> list[tuple[str, dict]]:
    """(split, shard entry) for every shard of a manifest."""
    return [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]


def read_manifest(store: Store) -> dict:
    """DST's manifest, checked as data: the rest of cectl may trust its shape and names."""
    where = store.url(MANIFEST)
    if not store.exists(MANIFEST):
        raise BadInput(f"{where} not found: run `cectl shard` into this location first")
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{where} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInput(f"{where} is not a cectl shard manifest")
    if problem := manifest_problem(manifest):
        raise BadInput(f"{where} is damaged ({problem}): shard the images again")
    return manifest


SHA256 = re.compile(r"[0-9a-f]{64}")


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable, or None: shapes, counts, shard names under DST."""
    splits, totals = manifest.get("splits"), manifest.get("totals")
    if not isinstance(splits, dict) or not isinstance(totals, dict):
        return "splits and totals must be mappings"
    for split, info in splits.items():
        if split not in SPLITS:
            return f"unknown split {split!r}"
        if not (isinstance(info, dict) and isinstance(info.get("shards"), list)
                and _count(info.get("samples")) and _count(info.get("bytes"))):
            return f"split {split} needs a list of shards and sample and byte counts"
        for shard in info["shards"]:
            if not (isinstance(shard, dict) and _count(shard.get("samples"))
                    and _count(shard.get("bytes")) and isinstance(shard.get("sha256"), str)):
                return f"a {split} shard needs a name, sample and byte counts and a sha256"
            name = shard.get("name")
            if not (isinstance(name, str) and name.startswith(f"{split}/") and safe_key(name)):
                return f"{split} shard name {name!r} is not a path inside {split}/"
            if not SHA256.fullmatch(shard["sha256"]):  # it names the shard's cached copy
                return f"{split} shard {name} has a sha256 that is not 64 hex digits"
        for key in ("samples", "bytes"):
            if info[key] != sum(shard[key] for shard in info["shards"]):
                return f"the {split} {key} do not add up"
    counts = {"samples": sum(info["samples"] for info in splits.values()),
              "shards": sum(len(info["shards"]) for info in splits.values()),
              "bytes": sum(info["bytes"] for info in splits.values())}
    if any(totals.get(key) != value for key, value in counts.items()):
        return "the totals do not add up"
    return None
