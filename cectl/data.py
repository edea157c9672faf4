"""The loader: a WebDataset pipeline over a shard manifest (local or S3), exactly resumable
whatever the number of training workers.

The data position is one integer that does not depend on the world size: the number of
samples the whole job has consumed, counted along a global order. The global order is
epoch after epoch; inside an epoch, the train shards come in an order shuffled per epoch
and the samples of each shard in an order shuffled per shard and epoch, all from the seed.
Every step consumes the next global batch: a contiguous span of that order, cut into one
share per rank (rank r the r-th share). A rank's loader processes take its batches in
turn, process k the batches k, k + n, ... since the loader (re)started. So after any
number of steps the consumed samples are exactly a prefix of the global order: a new
worker group, of any size, starts at the same count and sees every sample of the epoch
once, none twice; a rank may start in the middle of a shard.

Reading stays sequential: positions only grow, so each loader process streams the shards
it meets in order and keeps the current one in memory, reading each shard at most once
per epoch and decoding only its own samples. The price of world independence: a shard is
read by every loader process that takes a share of it, about min(ranks x processes,
shard size / per-rank batch) of them (1000 / 64: ~16 with the defaults); the JPEG
decoding, which dominates, is still split. From local disk those reads hit the page
cache; shards on S3 are fetched once per machine into a `ShardCache` that the loader
processes there share, so the network carries each shard once per machine and epoch.

Random crops (and flips) are seeded per sample from its global position, so a sample's
crop does not depend on the world size either.

Samples come from webdataset's tar reader (`cectl.shard_format.read_samples`), but the read order
is cectl's own: webdataset's shuffles and shard lists keep no state that can be saved and
restored, so they cannot resume mid-epoch at an exact sample, let alone on another world.
"""

from __future__ import annotations

import bisect
import importlib.util
import itertools
import json
import os
import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cectl.errors import BadInput, CectlError, Failure
from cectl.masks import derive_seed
from cectl.pixels import EncodedBatch, decode_batch, encoded_sample, to_batch, train_sample
from cectl.shard_cache import ShardCache
from cectl.shard_format import read_samples
from cectl.storage import Store, open_store

SAMPLE_LOG = "CECTL_SAMPLE_LOG"  # debug: a file each rank appends its batches' sample keys to


def debug_log(record: dict) -> None:
    """Append `record` to the CECTL_SAMPLE_LOG file, if set: one line, whole (O_APPEND)."""
    if log := os.environ.get(SAMPLE_LOG):
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_shards(manifest: dict) -> list[dict]:
    """The train shards that hold samples, in manifest order."""
    if "train" not in manifest["splits"]:
        raise BadInput("the shards have no 'train' split")
    shards = [s for s in manifest["splits"]["train"]["shards"] if s["samples"]]
    if not shards:
        raise BadInput("the 'train' split holds no samples (see `skipped` in manifest.json)")
    return shards


def batch_shares(cfg, world: int) -> list[int]:
    """Each rank's batch size: `data.batch_size` each (`per-worker`), or `data.batch_size`
    for the whole job split over the ranks, shares differing by one at most (`global`)."""
    size = cfg.data.batch_size
    if cfg.data.batch_policy == "per-worker":
        return [size] * world
    if size < world:
        raise BadInput(f"data.batch_size={size} with data.batch_policy=global cannot be split "
                       f"over {world} workers: raise data.batch_size")
    return [size // world + (rank < size % world) for rank in range(world)]


class GlobalOrder:
    """The seed-determined order of all train samples, epoch after epoch, by position.

    `sample(position)` streams: positions asked for in increasing order read each shard
    once, when its first sample is asked for.
    """

    def __init__(self, store: Store, shards: list[dict], seed: int):
        self.store, self.shards, self.seed = store, shards, seed
        # On local disk the page cache serves the repeated reads; S3 needs a copy here.
        self.cache = None if store.local_path("") else ShardCache(store)
        self.epoch_len = sum(s["samples"] for s in shards)
        self._epoch: tuple[int, list[dict], list[int]] | None = None  # epoch, order, starts
        self._shard: tuple[int, str, list[dict]] | None = None  # epoch, name, samples

    def shard_order(self, epoch: int) -> tuple[list[dict], list[int]]:
        """The shards of an epoch in order, and the position in the epoch each starts at."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = list(self.shards)
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
            starts = list(itertools.accumulate((s["samples"] for s in order), initial=0))
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def sample(self, position: int) -> dict:
        epoch, offset = divmod(position, self.epoch_len)
        order, starts = self.shard_order(epoch)
        i = bisect.bisect_right(starts, offset) - 1
        shard = order[i]
        if self._shard is None or self._shard[:2] != (epoch, shard["name"]):
            try:
                copy = self.cache.open(shard) if self.cache else None
                samples = read_samples(self.store, shard["name"], copy)
            except OSError as e:  # a full disk, a broken link: the cause, not a traceback
                raise Failure(f"cannot read {self.store.url(shard['name'])}: "
                              f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
                              ) from None
            if len(samples) != shard["samples"]:
                raise BadInput(f"{shard['name']} holds {len(samples)} samples, the manifest "
                               f"says {shard['samples']}: run `cectl verify`")
            random.Random(derive_seed(self.seed, shard["name"], epoch)).shuffle(samples)
            self._shard = (epoch, shard["name"], samples)
        return self._shard[2][offset - starts[i]]


class TrainBatches(IterableDataset):
    """One rank's batches, as (images or encoded batch, sample keys); each loader process
    plays every `processes`-th batch from the global position `start` on."""

    def __init__(self, data_uri: str, shards: list[dict], start: int, shares: list[int],
                 rank: int, seed: int, load_size: int, image_size: int, encoded: bool):
        super().__init__()
        self.data_uri, self.shards, self.start = data_uri, shards, start
        self.shares, self.rank, self.seed = shares, rank, seed
        self.load_size, self.image_size, self.encoded = load_size, image_size, encoded

    def __iter__(self) -> Iterator[tuple[torch.Tensor | EncodedBatch, list[str]] | CectlError]:
        # Errors are passed on as values: raised in a loader process, they would reach the
        # user wrapped in that process's traceback.
        try:
            yield from self._batches()
        except CectlError as e:
            yield e
        except Exception as e:
            if os.environ.get("CECTL_DEBUG"):
                raise
            yield Failure(f"unexpected {type(e).__name__} in the loader: {e}")

    def _batches(self) -> Iterator[tuple[torch.Tensor | EncodedBatch, list[str]]]:
        info = get_worker_info()
        process, processes = (info.id, info.num_workers) if info else (0, 1)
        order = GlobalOrder(open_store(self.data_uri), self.shards, self.seed)
        global_batch, offset = sum(self.shares), sum(self.shares[:self.rank])
        prepare = encoded_sample if self.encoded else train_sample
        for k in itertools.count(process, processes):
            first = self.start + k * global_batch + offset
            positions = range(first, first + self.shares[self.rank])
            samples = [order.sample(p) for p in positions]
            items = [prepare(s, self.load_size, self.image_size,
                             random.Random(derive_seed(self.seed, "crop", p)))
                     for s, p in zip(samples, positions, strict=True)]
            batch = (EncodedBatch(*map(list, zip(*items, strict=True))) if self.encoded
                     else to_batch(items))
            yield batch, [s["__key__"] for s in samples]


def gpu_decoding(mode: str, device: torch.device) -> bool:
    """`data.decode` for this device: whether batches are decoded on the GPU."""
    available = device.type == "cuda" and importlib.util.find_spec("torchvision") is not None
    if mode == "gpu" and not available:
        raise BadInput("data.decode=gpu needs a CUDA GPU and torchvision "
                       "(pip install 'cectl[gpu]'); use data.decode=cpu or auto")
    return mode == "gpu" or (mode == "auto" and available)


class TrainLoader:
    """Batches for one rank, as uint8 NCHW on `device`. Its state, the number of samples the
    whole job has consumed (`{"samples": N}`), is the data position a checkpoint saves and
    restores.

    With `encoded`, loader processes only parse tars and read headers; the pixels are
    decoded here, on the device (`decode_batch`).
    """

    def __init__(self, data_uri: str, manifest: dict, cfg, rank: int, world: int,
                 device: torch.device | None = None, encoded: bool = False):
        self.data_uri, self.cfg, self.rank, self.world = data_uri, cfg, rank, world
        self.device, self.encoded = device or torch.device("cpu"), encoded
        self.shards = train_shards(manifest)
        self.shares = batch_shares(cfg, world)
        self.samples = 0
        self.positions = range(0)  # global positions of the batch handed out last
        self._iter: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position. A per-rank one (`batches`, written before the position was
        global) only on the world it was saved with; it becomes the same number of samples,
        the same progress through the epoch, but in the global order: not the same samples
        the old per-rank streams would have read, so that one resume is approximate."""
        if "batches" in state:
            if state.get("world", 1) != self.world:
                raise BadInput(f"this checkpoint's data position holds for {state.get('world', 1)}"
                               f" workers, not {self.world}: resume it with that many workers")
            state = {"samples": int(state["batches"]) * sum(self.shares)}
        self.samples, self._iter = int(state["samples"]), None

    def _start(self) -> Iterator:
        cfg = self.cfg
        dataset = TrainBatches(self.data_uri, self.shards, self.samples, self.shares,
                               self.rank, cfg.train.seed, cfg.data.load_size,
                               cfg.data.image_size, self.encoded)
        # Its own generator: every random draw of the pipeline is seeded from the data
        # position, and the global RNG (dropout, a checkpoint's RNG state) stays untouched.
        # Pinned pages let the copy to a GPU run without blocking this process.
        return iter(DataLoader(dataset, batch_size=None, num_workers=cfg.data.workers,
                               prefetch_factor=4 if cfg.data.workers else None,
                               pin_memory=self.device.type == "cuda" and not self.encoded,
                               generator=torch.Generator().manual_seed(cfg.train.seed)))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            self._iter = self._start()
        item = next(self._iter)
        if isinstance(item, CectlError):
            raise item
        batch, keys = item
        first = self.samples + sum(self.shares[:self.rank])
        self.positions = range(first, first + len(keys))
        debug_log({"rank": self.rank, "world": self.world, "position": first, "keys": keys})
        self.samples += sum(self.shares)
        if self.encoded:
            return decode_batch(batch, self.cfg.data.image_size, self.device)
        return batch.to(self.device, non_blocking=True)
