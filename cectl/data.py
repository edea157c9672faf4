"""The loader: a WebDataset pipeline over a shard manifest (local or S3), exactly resumable.

Each training worker (rank) takes every `world`-th shard; its loader processes split those
again, so no sample is read twice in a pass. Each loader process ("stream") reads its
shards in an order shuffled per epoch, shuffles the samples inside each shard, and goes
on forever. A stream's place is one integer, the number of samples it has consumed; from
it, the epoch, the shard and the offset inside the shard follow from the manifest's
sample counts. So resuming reads only the one shard it resumes in, skips nothing
and repeats nothing. Random crops are seeded per sample from that same position.
"""

from __future__ import annotations

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


def assign_shards(manifest: dict, split: str, rank: int, world: int, streams: int) -> list[list]:
    """The shards of each stream of one rank: disjoint across ranks and streams."""
    if split not in manifest["splits"]:
        raise BadInput(f"the shards have no {split!r} split")
    shards = [s for s in manifest["splits"][split]["shards"] if s["samples"]]
    if not shards:
        raise BadInput(f"the {split!r} split holds no samples (see `skipped` in manifest.json)")
    mine = shards[rank::world]
    if not mine:
        raise BadInput(f"{len(shards)} {split} shards cannot feed {world} workers: reshard "
                       "with a smaller --shard-size")
    n = max(1, min(streams, len(mine)))
    return [mine[k::n] for k in range(n)]


def read_samples(store: Store, name: str) -> list[dict]:
    """All samples of one shard, raw bytes by extension."""
    with store.open(name) as f:
        files = ({**member, "__url__": name} for member in wds.tariterators.tar_file_iterator(f))
        return list(wds.tariterators.group_by_keys(files))


def stream_samples(store: Store, shards: list[dict], seed: int, tag: str,
                   start: int) -> Iterator[tuple[int, dict]]:
    """(position, sample) from `start` on, forever, epoch after epoch."""
    epoch_len = sum(s["samples"] for s in shards)
    position = start
    while True:
        epoch, offset = divmod(position, epoch_len)
        order = list(shards)
        random.Random(derive_seed(seed, tag, "epoch", epoch)).shuffle(order)
        for shard in order:
            if offset >= shard["samples"]:
                offset -= shard["samples"]
                continue
            samples = read_samples(store, shard["name"])
            if len(samples) != shard["samples"]:
                raise BadInput(f"{shard['name']} holds {len(samples)} samples, the manifest "
                               f"says {shard['samples']}: run `cectl verify`")
            random.Random(derive_seed(seed, shard["name"], epoch)).shuffle(samples)
            for sample in samples[offset:]:
                yield position, sample
                position += 1
            offset = 0


def sample_image(sample: dict, draft_to: int = 0) -> Image.Image:
    data = sample.get("jpg") or sample.get("png")
    if data is None:
        raise BadInput(f"sample {sample.get('__key__')} has no .jpg or .png")
    return decode(data, draft_to=draft_to).image


def train_crop(img: Image.Image, load_size: int, image_size: int, rng: random.Random) -> np.ndarray:
    """loadSize, a random fineSize crop, a horizontal flip with p = 0.5 (donkey_folder.lua)."""
    img = resize_shorter(img, max(load_size, image_size), upscale=True)
    x = rng.randint(0, img.size[0] - image_size)
    y = rng.randint(0, img.size[1] - image_size)
    crop = img.crop((x, y, x + image_size, y + image_size))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


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
    """Batches from one rank's streams; each loader process plays one stream."""

    def __init__(self, data_uri: str, streams: list[list[dict]], batches: int,
                 seed: int, rank: int, batch_size: int, load_size: int, image_size: int):
        super().__init__()
        self.data_uri, self.streams, self.batches = data_uri, streams, batches
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.load_size, self.image_size = load_size, image_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        process = info.id if info else 0
        # The loader hands out batches from its processes in turn; after `batches`
        # batches, the next one must come from stream `batches % n`, so process 0
        # plays that stream. Stream k has given one batch in every n so far.
        n = len(self.streams)
        k = (process + self.batches) % n
        start = self.batch_size * max(0, -(-(self.batches - k) // n))
        store = open_store(self.data_uri)
        tag = f"rank{self.rank}/stream{k}"
        images = []
        for position, sample in stream_samples(store, self.streams[k], self.seed, tag, start):
            rng = random.Random(derive_seed(self.seed, tag, "crop", position))
            img = sample_image(sample, draft_to=self.load_size)
            images.append(train_crop(img, self.load_size, self.image_size, rng))
            if len(images) == self.batch_size:
                yield to_batch(images)
                images = []


def worker_batch(cfg, world: int) -> int:
    """Images per worker and step: data.batch_size, or under data.batch_policy=global
    its share of data.batch_size, so that the effective batch stays the recipe's."""
    if cfg.data.batch_policy != "global":
        return cfg.data.batch_size
    if cfg.data.batch_size % world:
        raise BadInput(f"data.batch_policy=global cannot split data.batch_size="
                       f"{cfg.data.batch_size} evenly over {world} workers: make it a "
                       f"multiple of {world}")
    return cfg.data.batch_size // world


class TrainLoader:
    """Iterates batches for one rank, counting them: the count is the data position."""

    def __init__(self, data_uri: str, manifest: dict, cfg, rank: int, world: int,
                 batches: int = 0):
        streams = assign_shards(manifest, "train", rank, world, max(1, cfg.data.workers))
        self.batches = batches
        dataset = TrainStreams(data_uri, streams, batches, cfg.train.seed, rank,
                               worker_batch(cfg, world), cfg.data.load_size, cfg.data.image_size)
        processes = len(streams) if cfg.data.workers > 0 else 0
        self.loader = DataLoader(dataset, batch_size=None, num_workers=processes,
                                 prefetch_factor=4 if processes else None,
                                 persistent_workers=False)
        self._iter = iter(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._iter)
        self.batches += 1
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
