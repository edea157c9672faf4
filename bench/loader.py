"""Loader throughput per process: cectl's decode path against Pillow's, same shards, same run.

Inputs: the shared Paris StreetView images re-saved as 500x375 JPEGs under several names,
sharded by `cectl shard` at 350 px (so every stored JPEG is 467x350, as Paris StreetView
or ImageNet shards are). Each contender runs the whole per-process pipeline in this
process (`data.workers=0`): tar parsing, shuffling, decode, resize to `data.load_size`,
random 128 px crop, batching. The baseline is the per-sample path the loader had before
(Pillow decode with `draft`, Pillow resize and crop); cectl's is `cectl.pixels.cut_sample`
(simplejpeg decode, crop as an array slice). Rounds alternate so both see the same load.

    .venv/bin/python bench/loader.py [--copies 8] [--batches 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console

from cectl import batches
from cectl.config import load_config
from cectl.data import TrainLoader
from cectl.images import decode, resize_shorter
from cectl.pixels import Crop, plan_crop
from cectl.schema import JobConfig, ShardConfig
from cectl.shard import run_shard
from cectl.shard_format import open_manifest, read_manifest, read_samples
from cectl.storage import open_store

PARIS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paris-streetview-eval"
BATCH = 64


def make_shards(root: Path, copies: int) -> str:
    images = root / "images"
    images.mkdir()
    for source in sorted(PARIS.glob("*.png")):
        big = Image.open(source).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        for copy in range(copies):
            big.save(images / f"{copy}-{source.stem}.jpg", quality=90)
    run_shard(str(images), str(root / "shards"),
              load_config(ShardConfig, flags={"shard_size": 100, "workers": 2}),
              Console(quiet=True))
    return str(root / "shards")


def pillow_sample(sample: dict, crop: Crop, image_size: int) -> np.ndarray:
    img = decode(sample.get("jpg") or sample["png"], draft_to=min(crop.height, crop.width)).image
    img = resize_shorter(img, min(crop.height, crop.width), upscale=True)
    return np.asarray(img.crop((crop.x, crop.y, crop.x + image_size, crop.y + image_size)))


def rate(shards: str, batches: int) -> float:
    cfg = OmegaConf.merge(load_config(JobConfig),
                          {"data": {"uri": shards, "workers": 0, "batch_size": BATCH}})
    loader = TrainLoader(shards, open_manifest(shards), cfg, 0, 1)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return BATCH * batches / (time.perf_counter() - start)


def per_sample_rate(shards: str, fn) -> float:
    """Decode + crop alone, over one shard's samples already in memory."""
    store = open_store(shards)
    samples = read_samples(store, read_manifest(store)["splits"]["train"]["shards"][0]["name"])
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        fn(sample, plan_crop(sample, 350, 128, random.Random(i)), 128)
    return len(samples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shards = make_shards(Path(tempfile.mkdtemp(prefix="cectl-bench-loader-")), args.copies)
    cectl_sample = batches.cut_sample
    names = ("Pillow (baseline)", "cectl (simplejpeg)")
    loader: dict[str, list[float]] = {name: [] for name in names}
    sample: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, fn in zip(names, (pillow_sample, cectl_sample), strict=True):
            batches.cut_sample = fn  # the only difference between the contenders
            loader[name].append(rate(shards, args.batches))
            sample[name].append(per_sample_rate(shards, fn))
    batches.cut_sample = cectl_sample
    for title, results in (("loader process", loader), ("decode + crop alone", sample)):
        base = max(results[names[0]])
        for name, rates in results.items():
            print(f"{title:20s} {name:20s} best {max(rates):7.0f} images/s  all "
                  f"{', '.join(f'{r:.0f}' for r in rates)}  ratio {max(rates) / base:.2f}x")


if __name__ == "__main__":
    main()
