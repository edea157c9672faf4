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
shard size / per-rank batch) of them (1000 / 64: ~16 with the defaults), so the job reads
the tar bytes that many times; the JPEG decoding, which dominates, is still split.
Smaller shards (`cectl shard --shard-size`) bring the factor down.

Random crops are seeded per sample from its global position, so a sample's crop does not
depend on the world size either.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cectl.errors import BadInput
from cectl.images import decode, resize_shorter
from cectl.masks import derive_seed
from cectl.shard import read_manifest
from cectl.storage import Store, open_store

SAMPLE_LOG = "CECTL_SAMPLE_LOG"  # debug: a file each rank appends its batches' sample keys to


def train_shards(manifest: dict) -> list[dict]:
    """The train shards that hold samples, in manifest order."""
    if "train" not in manifest["splits"]:
        raise BadInput("the shards have no 'train' split")
    shards = [s for s in manifest["splits"]["train"]["shards"] if s["samples"]]
    if not shards:
        raise BadInput("the 'train' split holds no samples (see `skipped` in manifest.json)")
    return shards


def batch_shares(cfg, world: int) -> list[int]:
    """Each rank's batch size: `data.batch_size` each (`per_worker`), or `data.batch_size`
    for the whole job split over the ranks, shares differing by one at most (`global`)."""
    size = cfg.data.batch_size
    if cfg.data.batch_policy == "per_worker":
        return [size] * world
    if size < world:
        raise BadInput(f"data.batch_size={size} with data.batch_policy=global cannot be split "
                       f"over {world} workers: raise data.batch_size")
    return [size // world + (rank < size % world) for rank in range(world)]


def read_samples(store: Store, name: str) -> list[dict]:
    """All samples of one shard, raw bytes by extension."""
    with store.open(name) as f:
        files = ({**member, "__url__": name} for member in wds.tariterators.tar_file_iterator(f))
        return list(wds.tariterators.group_by_keys(files))


class GlobalOrder:
    """The seed-determined order of all train samples, epoch after epoch, by position.

    `sample(position)` streams: positions asked for in increasing order read each shard
    once, when its first sample is asked for.
    """

    def __init__(self, store: Store, shards: list[dict], seed: int):
        self.store, self.shards, self.seed = store, shards, seed
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
            samples = read_samples(self.store, shard["name"])
            if len(samples) != shard["samples"]:
                raise BadInput(f"{shard['name']} holds {len(samples)} samples, the manifest "
                               f"says {shard['samples']}: run `cectl verify`")
            random.Random(derive_seed(self.seed, shard["name"], epoch)).shuffle(samples)
            self._shard = (epoch, shard["name"], samples)
        return self._shard[2][offset - starts[i]]


def sample_image(sample: dict, draft_to: int = 0) -> Image.Image:
    data = sample.get("jpg") or sample.get("png")
    if data is None:
        raise BadInput(f"sample {sample.get('__key__')} has no .jpg or .png")
    return decode(data, draft_to=draft_to).image


def train_crop(img: Image.Image, load_size: int, image_size: int, rng: random.Random) -> np.ndarray:
    """loadSize then a random fineSize crop, as the reference code does."""
    img = resize_shorter(img, max(load_size, image_size), upscale=True)
    x = rng.randint(0, img.size[0] - image_size)
    y = rng.randint(0, img.size[1] - image_size)
    return np.asarray(img.crop((x, y, x + image_size, y + image_size)))


def eval_crop(img: Image.Image, image_size: int) -> np.ndarray:
    """The whole image, shorter side to fineSize, center crop: deterministic."""
    img = resize_shorter(img, image_size, upscale=True)
    x, y = (img.size[0] - image_size) // 2, (img.size[1] - image_size) // 2
    return np.asarray(img.crop((x, y, x + image_size, y + image_size)))


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays to one NCHW uint8 tensor (converted to float on the device)."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


class TrainStreams(IterableDataset):
    """One rank's batches, as (images, sample keys); each loader process plays every
    `processes`-th batch from the global position `start` on."""

    def __init__(self, data_uri: str, shards: list[dict], start: int, shares: list[int],
                 rank: int, seed: int, load_size: int, image_size: int):
        super().__init__()
        self.data_uri, self.shards, self.start = data_uri, shards, start
        self.shares, self.rank, self.seed = shares, rank, seed
        self.load_size, self.image_size = load_size, image_size

    def decode(self, sample: dict, position: int) -> np.ndarray:
        """One training image: decoded and randomly cropped, seeded by its global position."""
        rng = random.Random(derive_seed(self.seed, "crop", position))
        img = sample_image(sample, draft_to=self.load_size)
        return train_crop(img, self.load_size, self.image_size, rng)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        info = get_worker_info()
        process, processes = (info.id, info.num_workers) if info else (0, 1)
        order = GlobalOrder(open_store(self.data_uri), self.shards, self.seed)
        global_batch, offset = sum(self.shares), sum(self.shares[:self.rank])
        for k in itertools.count(process, processes):
            first = self.start + k * global_batch + offset
            positions = range(first, first + self.shares[self.rank])
            samples = [order.sample(p) for p in positions]
            yield (to_batch([self.decode(s, p) for s, p in zip(samples, positions, strict=True)]),
                   [s["__key__"] for s in samples])


class TrainLoader:
    """Batches for one rank. Its state, the number of samples the whole job has consumed
    (`{"samples": N}`), is the data position a checkpoint saves and restores."""

    def __init__(self, data_uri: str, manifest: dict, cfg, rank: int, world: int):
        self.data_uri, self.cfg, self.rank, self.world = data_uri, cfg, rank, world
        self.shards = train_shards(manifest)
        self.shares = batch_shares(cfg, world)
        self.samples = 0
        self._iter: Iterator[tuple[torch.Tensor, list[str]]] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position. A per-rank one (`batches`, written before the position was
        global) only on the world it was saved with; it becomes the same number of samples:
        the same progress through the epoch, in the global order."""
        if "batches" in state:
            if state.get("world", 1) != self.world:
                raise BadInput(f"this checkpoint's data position holds for {state.get('world', 1)}"
                               f" workers, not {self.world}: resume it with that many workers")
            state = {"samples": int(state["batches"]) * sum(self.shares)}
        self.samples, self._iter = int(state["samples"]), None

    def _start(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        cfg = self.cfg
        dataset = TrainStreams(self.data_uri, self.shards, self.samples, self.shares,
                               self.rank, cfg.train.seed, cfg.data.load_size,
                               cfg.data.image_size)
        # Its own generator: every random draw of the pipeline is seeded from the data
        # position, and the global RNG (dropout, a checkpoint's RNG state) stays untouched.
        return iter(DataLoader(dataset, batch_size=None, num_workers=cfg.data.workers,
                               prefetch_factor=4 if cfg.data.workers else None,
                               generator=torch.Generator().manual_seed(cfg.train.seed)))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            self._iter = self._start()
        batch, keys = next(self._iter)
        if log := os.environ.get(SAMPLE_LOG):
            with open(log, "a") as f:
                first = self.samples + sum(self.shares[:self.rank])
                f.write(json.dumps({"rank": self.rank, "world": self.world,
                                    "position": first, "keys": keys}) + "\n")
        self.samples += sum(self.shares)
        return batch


def load_eval_images(data_uri: str, split: str, image_size: int,
                     limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every image of a split (or the first `limit`), center-cropped, in manifest order."""
    store = open_store(data_uri)
    manifest = read_manifest(store)
    if split not in manifest["splits"]:
        raise BadInput(f"{data_uri} has no {split!r} split (it has "
                       f"{', '.join(manifest['splits'])})")
    arrays, keys = [], []
    for shard in manifest["splits"][split]["shards"]:
        for sample in read_samples(store, shard["name"]):
            arrays.append(eval_crop(sample_image(sample), image_size))
            keys.append(sample["__key__"])
            if limit and len(arrays) == limit:
                return to_batch(arrays), keys
    if not arrays:
        raise BadInput(f"the {split!r} split of {data_uri} is empty")
    return to_batch(arrays), keys


def open_manifest(data_uri: str) -> dict:
    store = open_store(data_uri)
    store.check()
    return read_manifest(store)
