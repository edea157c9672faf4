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

Samples come from webdataset's tar reader (`cectl.shard.read_samples`), but the read order
is cectl's own: webdataset's shuffles and shard lists keep no state that can be saved and
restored, so they cannot resume mid-epoch at an exact sample, let alone on another world.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import importlib.util
import itertools
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cectl.errors import BadInput, CectlError
from cectl.images import Skip, decode, open_image, resize_shorter
from cectl.masks import derive_seed
from cectl.shard import read_manifest, read_samples
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


class ShardCache:
    """Shards of a remote store, fetched once per machine into a folder that every loader
    process here shares.

    Each loader process reads every shard it takes a share of (see the module docstring),
    about 16 times per shard with the defaults: from S3 that would be 16x the traffic. A
    shard is stored by its manifest sha256, so a rebuilt shard is never taken for the
    old one; one lock file per shard keeps two processes from fetching it twice; beyond
    KEEP shards the oldest are dropped, unless a process holds their lock.
    """

    KEEP = 32  # ~3.5 GB of ImageNet shards; loader processes work within a few of them

    def __init__(self, store: Store):
        self.store = store
        self.folder = Path(tempfile.gettempdir(), "cectl-shard-cache")

    def open(self, shard: dict) -> BinaryIO:
        """The shard's bytes on this machine, fetched if no process here has yet."""
        self.folder.mkdir(parents=True, exist_ok=True)
        local = self.folder / f"{shard['sha256']}.tar"
        with open(local.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not local.exists():
                self.store.get_file(shard["name"], local)
                self._drop_old()
            return open(local, "rb")  # open under the lock: dropping it later is harmless

    def _drop_old(self) -> None:
        held = []
        for path in self.folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # another process dropped it
                held.append((path.stat().st_mtime, path))
        for _, old in sorted(held)[:-self.KEEP]:
            with contextlib.suppress(OSError), open(old.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: keep it
                old.unlink()


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
            copy = self.cache.open(shard) if self.cache else None
            samples = read_samples(self.store, shard["name"], copy)
            if len(samples) != shard["samples"]:
                raise BadInput(f"{shard['name']} holds {len(samples)} samples, the manifest "
                               f"says {shard['samples']}: run `cectl verify`")
            random.Random(derive_seed(self.seed, shard["name"], epoch)).shuffle(samples)
            self._shard = (epoch, shard["name"], samples)
        return self._shard[2][offset - starts[i]]


class Crop(NamedTuple):
    """Where a training crop comes from: the picture decoded at `decoded` (height, width;
    a JPEG at 1/2, 1/4 or 1/8 scale when that still covers loadSize), scaled to `height` x
    `width` (shorter side loadSize), cut at (`x`, `y`), then mirrored left to right if
    `flip` (p = 0.5, as donkey_folder.lua)."""

    decoded: tuple[int, int]
    height: int
    width: int
    x: int
    y: int
    flip: bool


def plan_crop(sample: dict, load_size: int, image_size: int, rng: random.Random) -> Crop:
    """The crop of a sample from its header alone: no pixel is decoded."""
    side = max(load_size, image_size)
    if "jpg" in sample:
        height, width = _jpeg_size(sample)
    elif "png" in sample:
        width, height = _png_size(sample)
    else:
        raise BadInput(f"{_where(sample)} has no .jpg or .png")
    if "jpg" in sample and min(width, height) > load_size:
        # Pillow's `draft` rule: the smallest 1/2, 1/4 or 1/8 scale that still covers it.
        scale = load_size / min(width, height)
        fits = min(width // round(width * scale), height // round(height * scale))
        reduce = next(k for k in (8, 4, 2, 1) if fits >= k)
        height, width = -(-height // reduce), -(-width // reduce)
    decoded = (height, width)
    if min(width, height) != side:  # `resize_shorter`'s arithmetic
        scale = side / min(width, height)
        height, width = max(side, round(height * scale)), max(side, round(width * scale))
    x = rng.randint(0, width - image_size)
    y = rng.randint(0, height - image_size)
    return Crop(decoded, height, width, x, y, flip=rng.random() < 0.5)


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} of shard {sample.get('__url__')}"


def _jpeg_size(sample: dict) -> tuple[int, int]:
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(sample["jpg"])
    except ValueError as e:
        raise BadInput(f"{_where(sample)} is not a readable JPEG ({e}): run `cectl verify`"
                       ) from None
    return height, width


def _png_size(sample: dict) -> tuple[int, int]:
    try:
        return open_image(sample["png"]).size  # the header alone
    except Skip as e:
        raise BadInput(f"{_where(sample)} is not a usable image ({e}): run `cectl verify`"
                       ) from None


def _png_pixels(sample: dict) -> np.ndarray:
    try:
        return np.asarray(decode(sample["png"]).image)
    except Skip as e:
        raise BadInput(f"{_where(sample)} is not a usable image ({e}): run `cectl verify`"
                       ) from None


def sample_pixels(sample: dict, decoded: tuple[int, int] | None = None) -> np.ndarray:
    """A sample's picture as HWC uint8 RGB: whole, or a JPEG at the DCT scale that gives
    `decoded` (a crop plan's, so the header is not read again).

    Shard JPEGs are RGB and upright (`cectl shard` makes them so), so they skip Pillow's
    general path: simplejpeg runs the same libjpeg-turbo decoder, same pixels, faster.
    """
    if "png" in sample:
        return _png_pixels(sample)
    height, width = decoded or (0, 0)  # 0: no reduction asked for
    try:
        return simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB", min_height=height,
                                      min_width=width)
    except ValueError as e:
        raise BadInput(f"{_where(sample)} is not a readable JPEG ({e}): run `cectl verify`"
                       ) from None


def scale_shorter(pixels: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic, as shards are resized); as it is if it already fits."""
    if min(pixels.shape[:2]) == size:
        return pixels
    return np.asarray(resize_shorter(Image.fromarray(pixels), size, upscale=True))


def cut(pixels: np.ndarray, crop: Crop, image_size: int) -> np.ndarray:
    if pixels.shape[:2] != (crop.height, crop.width):
        pixels = scale_shorter(pixels, min(crop.height, crop.width))
    pixels = pixels[crop.y : crop.y + image_size, crop.x : crop.x + image_size]
    return pixels[:, ::-1] if crop.flip else pixels


def eval_crop(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """The whole image, shorter side to fineSize, center crop: deterministic."""
    pixels = scale_shorter(pixels, image_size)
    y, x = (pixels.shape[0] - image_size) // 2, (pixels.shape[1] - image_size) // 2
    return pixels[y : y + image_size, x : x + image_size]


def train_sample(sample: dict, load_size: int, image_size: int,
                 rng: random.Random) -> np.ndarray:
    """Decode, loadSize, then a random fineSize crop, as the reference code does."""
    crop = plan_crop(sample, load_size, image_size, rng)
    return cut(sample_pixels(sample, crop.decoded), crop, image_size)


class EncodedBatch(NamedTuple):
    """A batch as the loader processes leave it for a GPU decoder: bytes and crops."""

    data: list[torch.Tensor]  # encoded JPEG/PNG, uint8
    jpeg: list[bool]
    crops: list[Crop]


def encoded_sample(sample: dict, load_size: int, image_size: int,
                   rng: random.Random) -> tuple[torch.Tensor, bool, Crop]:
    """The sample's bytes and its crop: tar parsing and a header read, no pixel work."""
    crop = plan_crop(sample, load_size, image_size, rng)
    data = sample["jpg"] if "jpg" in sample else sample["png"]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), "jpg" in sample, crop


def decode_batch(batch: EncodedBatch, image_size: int, device: torch.device) -> torch.Tensor:
    """NCHW uint8 crops on `device`: JPEGs through nvJPEG on a GPU (then a bicubic,
    antialiased resize on the GPU), else through the loader's own CPU path."""
    if device.type != "cuda":
        crops = [cut(sample_pixels({"jpg" if jpeg else "png": data.numpy().tobytes()},
                                   crop.decoded), crop, image_size)
                 for data, jpeg, crop in zip(*batch, strict=True)]
        return to_batch(crops).to(device)
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    jpegs = [data for data, jpeg in zip(batch.data, batch.jpeg, strict=True) if jpeg]
    decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    out = []
    for data, jpeg, crop in zip(*batch, strict=True):
        img = next(decoded) if jpeg else decode_png(data, ImageReadMode.RGB).to(device)
        if img.shape[1:] != (crop.height, crop.width):
            img = torch.nn.functional.interpolate(
                img[None].float(), size=(crop.height, crop.width), mode="bicubic",
                antialias=True)[0].round_().clamp_(0, 255).byte()
        img = img[:, crop.y : crop.y + image_size, crop.x : crop.x + image_size]
        out.append(img.flip(-1) if crop.flip else img)
    return torch.stack(out)


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays (views of the decoded pictures) to one NCHW uint8 tensor, in one
    copy; it becomes float on the device."""
    height, width, channels = arrays[0].shape
    batch = np.empty((len(arrays), channels, height, width), dtype=np.uint8)
    for out, array in zip(batch, arrays, strict=True):
        out[...] = array.transpose(2, 0, 1)
    return torch.from_numpy(batch)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


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
        try:
            yield from self._batches()
        except CectlError as e:
            # Passed on as a value: raised in a loader process, it would reach the user
            # wrapped in that process's traceback.
            yield e

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


def split_batches(data_uri: str, split: str, image_size: int,
                  batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """A split's images, center-cropped, in manifest order, as uint8 batches with their
    keys: streamed, never the whole split in memory."""
    store = open_store(data_uri)
    manifest = read_manifest(store)
    if split not in manifest["splits"]:
        raise BadInput(f"{data_uri} has no {split!r} split (it has "
                       f"{', '.join(manifest['splits'])})")
    arrays, keys = [], []
    for shard in manifest["splits"][split]["shards"]:
        for sample in read_samples(store, shard["name"]):
            arrays.append(eval_crop(sample_pixels(sample), image_size))
            keys.append(sample["__key__"])
            if len(arrays) == batch_size:
                yield to_batch(arrays), keys
                arrays, keys = [], []
    if arrays:
        yield to_batch(arrays), keys


def load_eval_images(data_uri: str, split: str, image_size: int,
                     limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every image of a split (or the first `limit`), center-cropped, in manifest order."""
    batch = next(split_batches(data_uri, split, image_size, limit or sys.maxsize), None)
    if batch is None:
        raise BadInput(f"the {split!r} split of {data_uri} is empty")
    return batch


def open_manifest(data_uri: str) -> dict:
    store = open_store(data_uri)
    store.check()
    return read_manifest(store)
