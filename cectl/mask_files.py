"""The user's own masks (white = hole): a set to train and evaluate with
(`mask.kind=files`), and masks matched to images by name (`cectl eval --mask DIR`,
`cectl inpaint --mask DIR`).

A set (`mask.source`) is a folder of mask images, or shards of them that `cectl shard`
made, on local disk or S3. Loader processes, several per rank on every machine, draw a
mask for every sample, so the set is read once per machine, not per process or batch:
the first process to open it lists the source, reads every mask (16 threads: a folder on
S3 is one request per file), scales it to fit the image (its longer side to
`data.image_size`), and writes them packed as bits into one file in the machine's cache
folder (`cectl.shard_cache.machine_folder`), named after the source's listing: each
file's size and time of change, or ETag, or the shards' sha256. The others, and every
later run on that listing, map that file: their pages are shared, and a hole is a few bit
operations. A file that is not a readable image, or holds no white pixel once scaled, is
skipped and counted, as `cectl shard` skips bad inputs.

A sample's hole is a mask of the set picked from its seed, flipped left-right and up-down
at random, and placed at a random position (along its shorter side, where it is not
square).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from cectl.errors import BadInput
from cectl.images import Skip, open_image, resize_shorter, to_8bit_grey
from cectl.locks import beyond_newest, machine_lock
from cectl.shard_cache import machine_folder, make_private
from cectl.shard_format import MANIFEST, read_manifest, read_samples, shard_names
from cectl.sources import INPUT_EXTENSIONS, sample_key
from cectl.storage import Store, open_store

FORMAT = 1  # of a set's files in the cache folder
THREADS = 16  # reading a set: mostly waiting on the disk or the network
CHUNK = 4096  # files of a folder given to the threads at a time
KEEP = 4  # sets kept in the cache folder (the oldest go, unless a process holds them)


def mask_grey(data: bytes) -> Image.Image:
    """A mask image as 8-bit grey (mode L): its hole is 128 or more. Skip if the bytes are
    no readable image."""
    image = open_image(data)
    try:
        image.load()
    except Exception as e:  # Pillow raises many types for damaged files
        raise Skip("corrupt", str(e) or type(e).__name__) from None
    return to_8bit_grey(image) if image.mode.startswith("I") else image.convert("L")


def hole_of(grey: Image.Image) -> np.ndarray:
    return np.asarray(grey) >= 128


def fit(grey: Image.Image, size: int) -> np.ndarray:
    """The hole of a mask scaled (bilinear) so that its longer side is `size`."""
    width, height = grey.size
    longer = max(width, height)
    shape = (max(1, round(width * size / longer)), max(1, round(height * size / longer)))
    return hole_of(grey if shape == grey.size else grey.resize(shape, Image.Resampling.BILINEAR))


class MaskFiles:
    """A mask set fitted to one image size, as this machine's cache holds it: `count`
    masks, and what was `skipped` ({reason: count}, and `skipped_files` one by one)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.source, self.size = path, meta["source"], meta["size"]
        self.shapes = np.array(meta["shapes"], dtype=np.int64).reshape(-1, 2)
        self.count = len(self.shapes)
        self.skipped, self.skipped_files = meta["skipped"], meta["skipped_files"]
        self.bits = self._map()

    def report(self) -> dict:
        """What the set holds and what was skipped, for a person (`cectl train`)."""
        return {"source": self.source, "masks": self.count, "skipped": self.skipped,
                "skipped_files": self.skipped_files}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "bits": None}

    def __setstate__(self, state: dict) -> None:
        # A spawned loader process maps the file itself (a forked one keeps the map).
        self.__dict__.update(state)
        self.bits = self._map()

    def _map(self) -> np.ndarray:
        """(count, size, size / 8) uint8: the masks packed, each in the top-left corner
        (the file holds a row more for each skipped file, written as the set was read)."""
        return np.load(self.path, mmap_mode="r")[: self.count]

    def holes(self, seeds: list[int], size: int) -> np.ndarray:
        """(n, size, size) bool holes, hole i from `seeds[i]` alone: a mask picked, flipped
        and placed."""
        if size != self.size:
            raise ValueError(f"this mask set is fitted to {self.size} px, not {size}")
        rngs = [random.Random(seed) for seed in seeds]
        picks = np.array([rng.randrange(self.count) for rng in rngs], dtype=np.int64)
        masks = np.unpackbits(self.bits[picks], axis=-1, count=size).view(bool)
        holes = np.zeros((len(seeds), size, size), dtype=bool)
        for hole, mask, pick, rng in zip(holes, masks, picks, rngs, strict=True):
            height, width = self.shapes[pick]
            mask = mask[:height, :width][:: rng.choice((1, -1)), :: rng.choice((1, -1))]
            y, x = rng.randint(0, size - height), rng.randint(0, size - width)
            hole[y : y + height, x : x + width] = mask
        return holes


def open_mask_files(source: str, size: int) -> MaskFiles:
    """The mask set at `source` fitted to `size` px: from this machine's cache, read into
    it first if no process here has read this listing of the source."""
    store = open_store(source)
    store.check()
    manifest = read_manifest(store) if store.exists(MANIFEST) else None
    if manifest is None:
        listing = {key: version for key, version in store.versions().items()
                   if _is_image(key)}
        most = len(listing)
    else:
        listing = {shard["name"]: shard["sha256"] for _, shard in shard_names(manifest)}
        most = sum(shard["samples"] for _, shard in shard_names(manifest))
    if not most:
        raise BadInput(f"{source} holds no mask images (PNG, JPEG, ...): give the folder of "
                       "masks, or their shards")
    name = hashlib.sha256(repr((FORMAT, size, store.uri, sorted(listing.items())))
                          .encode()).hexdigest()
    folder = machine_folder()
    make_private(folder)
    path = folder / f"masks-{name}.npy"
    with machine_lock(path.with_suffix(".lock")):
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            _write(path, _fitted_masks(store, manifest, listing, size), most, store.uri, size)
            _drop_old(folder)
        # Mapped under the lock: a process that drops the set later leaves the map be.
        files = MaskFiles(path, json.loads(meta_path.read_text()))
    if not files.count:
        raise BadInput(f"none of the {sum(files.skipped.values())} mask images in {source} "
                       f"is usable ({_reasons(files.skipped)}): white marks the hole")
    return files


def trained_mask_files(cfg: DictConfig) -> MaskFiles:
    """The mask set a model trained with (its `mask.source`), fitted to its image size."""
    if not cfg.mask.source:
        raise BadInput(f"this model trained with mask.kind={cfg.mask.kind}, without mask "
                       "files: give another --mask")
    return open_mask_files(cfg.mask.source, cfg.data.image_size)


def _is_image(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return not name.startswith(".") and "." + name.rsplit(".", 1)[-1].lower() in INPUT_EXTENSIONS


def _reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))


def _fitted_masks(store: Store, manifest: dict | None, listing: dict[str, str],
                  size: int) -> Iterator[tuple[str, np.ndarray | Skip]]:
    """Every mask of the source (where it is, and its hole fitted to `size` or why it is
    skipped), in order: a folder's files read and fitted THREADS at a time, shards one at a
    time with their samples fitted THREADS at a time. A few thousand at a time: memory
    holds their holes, not the set's bytes."""

    def fitted(data: bytes | None) -> np.ndarray | Skip:
        try:
            if data is None:
                raise Skip("missing", "gone since the folder was listed")
            hole = fit(mask_grey(data), size)
            return hole if hole.any() else Skip("no-hole", "no white pixel")
        except Skip as e:
            return e

    def read(key: str) -> tuple[str, np.ndarray | Skip]:
        try:
            data = store.read_bytes(key)
        except FileNotFoundError:
            data = None
        return store.url(key), fitted(data)

    def sample(shard: str, sample: dict) -> tuple[str, np.ndarray | Skip]:
        return (f"sample {sample['__key__']} of {store.url(shard)}",
                fitted(sample.get("png", sample.get("jpg"))))

    with ThreadPoolExecutor(THREADS) as pool:
        if manifest is None:
            keys = sorted(listing)
            for at in range(0, len(keys), CHUNK):
                yield from pool.map(read, keys[at : at + CHUNK])
            return
        for _, shard in shard_names(manifest):
            samples = read_samples(store, shard["name"])
            yield from pool.map(functools.partial(sample, shard["name"]), samples)


def _write(path: Path, masks: Iterator[tuple[str, np.ndarray | Skip]], most: int,
           source: str, size: int) -> None:
    """Write the set of (at most `most`) fitted `masks`: its packed bits (`path`, straight
    to disk), then its description (`path`.json), each through a temporary name."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    bits = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                     shape=(most, size, -(-size // 8)))
    shapes, skipped = [], []
    for where, hole in masks:
        if isinstance(hole, Skip):
            skipped.append({"path": where, "reason": hole.reason, "detail": str(hole)})
            continue
        packed = np.packbits(hole, axis=-1)
        bits[len(shapes), : packed.shape[0], : packed.shape[1]] = packed
        shapes.append(hole.shape)
    bits.flush()
    del bits
    partial.replace(path)
    meta = {"source": source, "size": size, "shapes": [list(s) for s in shapes],
            "skipped": dict(Counter(s["reason"] for s in skipped)), "skipped_files": skipped}
    partial.write_text(json.dumps(meta))
    partial.replace(path.with_suffix(".json"))


def _drop_old(folder: Path) -> None:
    """Beyond KEEP sets, remove the oldest whose lock no process holds."""
    for old in beyond_newest(folder, "masks-*.json", KEEP, lambda path: path.with_suffix(".lock")):
        old.unlink(missing_ok=True)
        old.with_suffix(".npy").unlink(missing_ok=True)


def masks_by_key(store: Store) -> dict[str, str]:
    """The mask images of a folder by the sample key their path gives (`sources.sample_key`:
    the path without its extension), as images are named in shards; two masks of one key
    (`a.png` and `a.jpg`, `x.1.png` and `x_1.png`) are refused, as either could be meant."""
    found: dict[str, str] = {}
    for key in filter(_is_image, store.list()):
        image = sample_key(key)
        if (other := found.setdefault(image, key)) != key:
            raise BadInput(f"{store.url(other)} and {store.url(key)} both name the mask of "
                           f"the image {image!r}: keep one")
    return found


def image_masks(folder: str, keys: list[str], size: int) -> torch.Tensor:
    """(n, 1, size, size) holes for the images of `keys`, each from the mask in `folder`
    named after it, cut as `cectl eval` cuts images (shorter side to `size`, the central
    square)."""
    store = open_store(folder)
    store.check()
    found = masks_by_key(store)
    missing = [key for key in keys if key not in found]
    if missing:
        raise BadInput(f"{len(missing)} of the {len(keys)} images have no mask in {folder}, "
                       f"the first {missing[0]!r}: name each mask after its image "
                       f"({store.url(missing[0])}.png)")
    holes = torch.zeros(len(keys), 1, size, size, dtype=torch.bool)
    for hole, key in zip(holes, keys, strict=True):
        where = store.url(found[key])
        try:
            grey = mask_grey(store.read_bytes(found[key]))
        except Skip as e:
            raise BadInput(f"mask {where} is not a readable image ({e.reason})") from None
        pixels = hole_of(resize_shorter(grey, size, upscale=True))
        y, x = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
        hole[0] = torch.from_numpy(pixels[y : y + size, x : x + size].copy())
        if not hole.any():
            raise BadInput(f"mask {where} leaves no hole in its image's central square: "
                           "white marks the hole")
    return holes
