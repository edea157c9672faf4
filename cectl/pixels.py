"""Pixels of shard samples: crop plans from headers, decoding, cropping, batching.

A training crop is planned from the image header alone (`plan_crop`: the JPEG DCT scale
to decode at, the resize, the random crop and flip), then decoded and cut in a loader
process (`cut_sample`), or shipped encoded and decoded on the GPU (`cectl.batches`).
Evaluation, inpainting and the feature commands read center crops through the same
decoder (`split_batches`). Pixels travel as uint8 NCHW and become float on the device.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from PIL import Image

from cectl.errors import BadInput
from cectl.images import Skip, decode, open_image, resize_shorter
from cectl.shard_format import read_manifest, read_samples
from cectl.storage import open_store


class Crop(NamedTuple):
    """Where a training crop comes from: the picture decoded at `decoded` (height, width;
    a JPEG at 1/`reduce` of its size, 2, 4 or 8 when that still covers loadSize), scaled
    to `height` x `width` (shorter side loadSize), cut at (`x`, `y`), then mirrored left
    to right if `flip` (p = 0.5, as donkey_folder.lua)."""

    decoded: tuple[int, int]
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
        width, height = _png_size(sample)
    else:
        raise BadInput(f"{_where(sample)} has no .jpg or .png")
    reduce = 1
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
    return Crop(decoded, reduce, height, width, x, y, flip=rng.random() < 0.5)


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


def crop_pixels(pixels: np.ndarray, crop: Crop, image_size: int) -> np.ndarray:
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
    return cut_sample(sample, plan_crop(sample, load_size, image_size, rng), image_size)


def cut_sample(sample: dict, crop: Crop, image_size: int) -> np.ndarray:
    """A sample's crop as planned: decoded (at the plan's DCT scale), resized, cut, flipped."""
    return crop_pixels(sample_pixels(sample, crop.decoded), crop, image_size)


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays (views of the decoded pictures) to one NCHW uint8 tensor, in one
    copy; it becomes float on the device."""
    height, width, channels = arrays[0].shape
    batch = np.empty((len(arrays), channels, height, width), dtype=np.uint8)
    for out, array in zip(batch, arrays, strict=True):
        out[...] = array.transpose(2, 0, 1)
    return torch.from_numpy(batch)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] to uint8 [0, 255], rounded: the inverse of `to_model_range`."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).byte()


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


