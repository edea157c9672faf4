"""The loader: a WebDataset pipeline over a shard manifest (local or S3), exactly resumable.

Each training worker (rank) takes every `world`-th shard; its loader processes split those
again, so no sample is read twice in a pass. Each loader process ("stream") reads its
shards in an order shuffled per epoch, shuffles the samples inside each shard, and goes
on forever. A stream's place is one integer, the number of samples it has consumed; from
it, the epoch, the shard and the offset inside the shard follow from the manifest's
sample counts. So resuming reads only the one shard it resumes in, skips nothing
and repeats nothing. Random crops are seeded per sample from that same position.

Samples come from webdataset's tar reader (`cectl.shard.read_samples`), but the read order
is cectl's own: webdataset's shuffles and shard lists keep no state that can be saved and
restored, so they cannot resume mid-epoch at an exact sample.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cectl.errors import BadInput, CectlError
from cectl.images import Skip, decode, resize_shorter
from cectl.masks import derive_seed
from cectl.shard import read_manifest, read_samples
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


class Crop(NamedTuple):
    """Where a training crop comes from: the JPEG decoded at 1/`reduce` scale, scaled to
    `height` x `width` (shorter side loadSize), cut at (`x`, `y`), then mirrored left to
    right if `flip` (p = 0.5, as donkey_folder.lua)."""

    reduce: int
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
        width, height = _png_pixels(sample).shape[1::-1]
    else:
        raise BadInput(f"{_where(sample)} has no .jpg or .png")
    reduce = 1
    if "jpg" in sample and min(width, height) > load_size:
        # Pillow's `draft` rule: the smallest 1/2, 1/4 or 1/8 scale that still covers it.
        scale = load_size / min(width, height)
        fits = min(width // round(width * scale), height // round(height * scale))
        reduce = next(k for k in (8, 4, 2, 1) if fits >= k)
        height, width = -(-height // reduce), -(-width // reduce)
    if min(width, height) != side:  # `resize_shorter`'s arithmetic
        scale = side / min(width, height)
        height, width = max(side, round(height * scale)), max(side, round(width * scale))
    x = rng.randint(0, width - image_size)
    y = rng.randint(0, height - image_size)
    return Crop(reduce, height, width, x, y, flip=rng.random() < 0.5)


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} of shard {sample.get('__url__')}"


def _jpeg_size(sample: dict) -> tuple[int, int]:
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(sample["jpg"])
    except ValueError as e:
        raise BadInput(f"{_where(sample)} is not a readable JPEG ({e}): run `cectl verify`"
                       ) from None
    return height, width


def _png_pixels(sample: dict) -> np.ndarray:
    try:
        return np.asarray(decode(sample["png"]).image)
    except Skip as e:
        raise BadInput(f"{_where(sample)} is not a usable image ({e}): run `cectl verify`"
                       ) from None


def sample_pixels(sample: dict, reduce: int = 1) -> np.ndarray:
    """A sample's picture as HWC uint8 RGB (a JPEG at 1/`reduce` scale).

    Shard JPEGs are RGB and upright (`cectl shard` makes them so), so they skip Pillow's
    general path: simplejpeg runs the same libjpeg-turbo decoder, same pixels, faster.
    """
    if "png" in sample:
        return _png_pixels(sample)
    height, width = _jpeg_size(sample)
    try:
        return simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB",
                                      min_height=-(-height // reduce),
                                      min_width=-(-width // reduce))
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
    return cut(sample_pixels(sample, crop.reduce), crop, image_size)


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
                                   crop.reduce), crop, image_size)
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


def stream_start(batches: int, process: int, streams: int) -> tuple[int, int]:
    """(stream, batches it has given) for a loader process after `batches` batches.

    The loader hands out batches from its processes in turn, so the next one must come
    from stream `batches % streams`: process 0 plays that stream, process 1 the next.
    Stream k has given one batch in every `streams` so far.
    """
    k = (process + batches) % streams
    return k, max(0, -(-(batches - k) // streams))


class TrainStreams(IterableDataset):
    """Batches from one rank's streams; each loader process plays one stream."""

    def __init__(self, data_uri: str, streams: list[list[dict]], batches: int,
                 seed: int, rank: int, batch_size: int, load_size: int, image_size: int,
                 encoded: bool):
        super().__init__()
        self.data_uri, self.streams, self.batches = data_uri, streams, batches
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.load_size, self.image_size, self.encoded = load_size, image_size, encoded

    def __iter__(self) -> Iterator[torch.Tensor | EncodedBatch | CectlError]:
        try:
            yield from self._batches()
        except CectlError as e:
            # Passed on as a value: raised in a loader process, it would reach the user
            # wrapped in that process's traceback.
            yield e

    def _batches(self) -> Iterator[torch.Tensor | EncodedBatch]:
        info = get_worker_info()
        k, done = stream_start(self.batches, info.id if info else 0, len(self.streams))
        start = self.batch_size * done
        store = open_store(self.data_uri)
        tag = f"rank{self.rank}/stream{k}"
        prepare = encoded_sample if self.encoded else train_sample
        items = []
        for position, sample in stream_samples(store, self.streams[k], self.seed, tag, start):
            rng = random.Random(derive_seed(self.seed, tag, "crop", position))
            items.append(prepare(sample, self.load_size, self.image_size, rng))
            if len(items) == self.batch_size:
                yield EncodedBatch(*map(list, zip(*items, strict=True))) if self.encoded \
                    else to_batch(items)
                items = []


def gpu_decoding(mode: str, device: torch.device) -> bool:
    """`data.decode` for this device: whether batches are decoded on the GPU."""
    available = device.type == "cuda" and importlib.util.find_spec("torchvision") is not None
    if mode == "gpu" and not available:
        raise BadInput("data.decode=gpu needs a CUDA GPU and torchvision "
                       "(pip install 'cectl[gpu]'); use data.decode=cpu or auto")
    return mode == "gpu" or (mode == "auto" and available)


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
    """Batches for one rank, as uint8 NCHW on `device`. Its state, the number of batches
    handed out, is the data position a checkpoint saves and restores.

    With `encoded`, loader processes only parse tars and read headers; the pixels are
    decoded here, on the device (`decode_batch`).
    """

    def __init__(self, data_uri: str, manifest: dict, cfg, rank: int, world: int,
                 device: torch.device | None = None, encoded: bool = False):
        self.data_uri, self.cfg, self.rank, self.encoded = data_uri, cfg, rank, encoded
        self.device = device or torch.device("cpu")
        self.batch_size = worker_batch(cfg, world)
        self.streams = assign_shards(manifest, "train", rank, world, max(1, cfg.data.workers))
        self.batches = 0
        self._iter: Iterator[torch.Tensor | EncodedBatch] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches, self._iter = int(state["batches"]), None

    def _start(self) -> Iterator[torch.Tensor | EncodedBatch]:
        cfg = self.cfg
        dataset = TrainStreams(self.data_uri, self.streams, self.batches, cfg.train.seed,
                               self.rank, self.batch_size, cfg.data.load_size,
                               cfg.data.image_size, self.encoded)
        processes = len(self.streams) if cfg.data.workers > 0 else 0
        # Its own generator: every random draw of the pipeline is seeded from the data
        # position, and the global RNG (dropout, a checkpoint's RNG state) stays untouched.
        # Pinned pages let the copy to a GPU run without blocking this process.
        return iter(DataLoader(dataset, batch_size=None, num_workers=processes,
                               prefetch_factor=4 if processes else None,
                               pin_memory=self.device.type == "cuda" and not self.encoded,
                               generator=torch.Generator().manual_seed(cfg.train.seed)))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        if isinstance(batch, CectlError):
            raise batch
        self.batches += 1
        if self.encoded:
            return decode_batch(batch, self.cfg.data.image_size, self.device)
        return batch.to(self.device, non_blocking=True)


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
            arrays.append(eval_crop(sample_pixels(sample), image_size))
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
