"""The input side alone, measured on a CPU: what feeding a GPU costs, without a GPU.

Inputs: generated 500x375 facade JPEGs sharded at 350 px, 100 per shard (stored 467x350,
as Paris StreetView or ImageNet shards are). Figures, printed as one JSON line:

- `images_per_s`: per loader process, with 1 and 2 processes (batch 64, center holes), in
  the GPU-decode layout (the processes parse, plan crops, draw holes and pack; the JPEGs
  are left for nvJPEG) and with CPU decoding (the processes also decode and cut the
  crops). The input thread only receives the batches: decoding the JPEGs and unpacking
  the batch are a GPU's work.
- `parse_amplification`: bytes of tar parsed (headers, indexes, images) per image byte
  delivered over one epoch, with 1, 2 and 4 loader processes (played one after another,
  each with its own reader, sharing this machine's shard index as real ones do).
- `train_thread_us_per_image`, `input_thread_us_per_image`: CPU time per image at batch
  256 in the GPU-decode layout, 2 loader processes, of the training thread (taking each
  batch) and of the loader's input thread (which gets batches ready while the training
  thread steps: receiving the batch and its holes and everything up to the decode). Not
  the decode (a stand-in here, its time taken out), nor what follows it on the GPU:
  cutting the crops, unpacking the holes (`cectl.batches.unpack_batch`).
- `holes_per_s`: holes one process draws per second, per mask kind, in batches of 64, at
  128 px (free-form: the default areas; files: a set of 200 masks of 512 x 512, free-form
  strokes saved as PNGs, as the NVIDIA irregular masks are).
- `mask_set_read_per_s`: masks of that set read into the machine's cache per second (the
  first process to open a set reads it; the others map the result).

Each rate is the best of `--rounds`: on a shared machine the best is the least disturbed.

    .venv/bin/python bench/feed.py [--images 1600] [--rounds 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cectl, without PYTHONPATH

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402

from cectl.batches import decode_jpegs  # noqa: E402
from cectl.config import load_config, validate_job  # noqa: E402
from cectl.data import GlobalOrder, TrainBatches, TrainLoader, batch_shares, train_shards  # noqa: E402
from cectl.demo import facade  # noqa: E402
from cectl.mask_files import MaskFiles, open_mask_files  # noqa: E402
from cectl.masks import KINDS, draw_holes, holes_for_positions  # noqa: E402
from cectl.schema import JobConfig, ShardConfig  # noqa: E402
from cectl.shard import run_shard  # noqa: E402
from cectl.shard_format import open_manifest  # noqa: E402
from cectl.storage import open_store  # noqa: E402

META = torch.device("meta")


def make_shards(root: Path, count: int, workers: int = 2) -> str:
    """`count` generated 500x375 facade JPEGs sharded at 350 px (stored 467x350), 100 per
    shard."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(count):
        facade(rng, 375).resize((500, 375)).save(images / f"{i:05d}.jpg", quality=90)
    run_shard(str(images), str(root / "shards"),
              load_config(ShardConfig, flags={"shard_size": 100, "workers": workers,
                                              "val_fraction": 0.0}),
              Console(quiet=True))
    return str(root / "shards")


def job(shards: str, batch: int, workers: int, mask: str = "center"):
    return validate_job(load_config(JobConfig, "inpaint-center", [
        f"data.batch_size={batch}", f"data.workers={workers}", f"mask.kind={mask}"],
        {"data": {"uri": shards}}))


class Timed:
    """A function that keeps the CPU time its calling thread spent in it."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args):
        start = time.thread_time()
        try:
            return self.function(*args)
        finally:
            self.seconds += time.thread_time() - start


def stand_in(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
    """nvJPEG's place: (3, H, W) meta tensors, sized from the JPEG headers."""
    import simplejpeg

    return [torch.empty(3, *simplejpeg.decode_jpeg_header(jpeg.numpy())[:2], dtype=torch.uint8,
                        device=META) for jpeg in jpegs]


def loader(shards: str, batch: int, processes: int, gpu_layout: bool,
           unpack=None) -> TrainLoader:
    """A loader on the meta device (nothing runs on a GPU), its input thread's unpacking
    replaced by `unpack`, every loader process started and busy."""
    cfg = job(shards, batch, processes)
    device = META if gpu_layout else torch.device("cpu")
    feed = TrainLoader(shards, open_manifest(shards), cfg, 0, 1, device, gpu_jpegs=gpu_layout)
    feed.unpacker.decode = stand_in
    if unpack:
        feed.unpacker.unpack = unpack
    for _ in range(max(2, processes) + 1):
        next(feed)
    return feed


def images_per_s(shards: str, processes: int, gpu_layout: bool, batches: int) -> float:
    """Per loader process: the input thread only receives the batches (decoding the
    JPEGs and unpacking the batch are the GPU's work)."""
    feed = loader(shards, 64, processes, gpu_layout, unpack=lambda batch: (None, None))
    start = time.perf_counter()
    for _ in range(batches):
        next(feed)
    return 64 * batches / (time.perf_counter() - start) / processes


def thread_us(shards: str, batches: int) -> dict[str, float]:
    """CPU time per image at batch 256 of the training thread (taking each batch) and of
    the loader's input thread (receiving it and everything up to the decode), neither
    counting the decode (a stand-in, its time taken out) nor the unpacking (GPU kernels)."""
    decoder = Timed(stand_in)
    feed = loader(shards, 256, 2, gpu_layout=True,
                  unpack=lambda batch: (decode_jpegs(batch, decoder), None))
    concurrent.futures.wait([feed._ahead])  # the batch prepared untimed
    decoder.seconds = 0.0
    prepare = feed._prepare = Timed(feed._prepare)
    take = Timed(feed.__next__)
    for _ in range(batches + 1):
        take()
    concurrent.futures.wait([feed._ahead])
    images = 256 * (batches + 1)
    return {"train_thread_us_per_image": take.seconds / images * 1e6,
            "input_thread_us_per_image": (prepare.seconds - decoder.seconds) / images * 1e6}


def parse_amplification(shards: str, processes: int) -> float:
    """Over one epoch, `processes` loader processes played in turn, on a fresh machine
    (no shard index yet)."""
    cache = tempfile.TemporaryDirectory(prefix="cectl-bench-feed-cache-")
    tempfile.tempdir = cache.name
    try:
        cfg = job(shards, 64, processes)
        manifest = open_manifest(shards)
        shards_, shares = train_shards(manifest), batch_shares(cfg, 1)
        epoch = sum(s["samples"] for s in shards_)
        dataset = TrainBatches(shards, shards_, 0, shares, 0, cfg, gpu_jpegs=True)
        read = delivered = 0
        for process in range(processes):
            order = GlobalOrder(open_store(shards), shards_, 0)
            batches = dataset.batches(order, process, processes)
            for _ in range(process, -(-epoch // 64), processes):
                next(batches)
            read, delivered = read + order.bytes_read, delivered + order.bytes_delivered
        return read / delivered
    finally:
        tempfile.tempdir = None
        cache.cleanup()


def mask_folder(root: Path, count: int = 200) -> Path:
    """`count` 512 x 512 mask PNGs (free-form strokes, of 10-60% of the image)."""
    folder = root / "masks"
    folder.mkdir()
    for i, hole in enumerate(draw_holes("free-form", count, 512, 0, 0, area=(0.1, 0.6))):
        Image.fromarray(hole[0].numpy().astype("uint8") * 255).save(folder / f"{i:05d}.png")
    return folder


def read_mask_set(folder: Path) -> tuple[MaskFiles, float]:
    """The set at 128 px, opened on a fresh machine (a cache folder of its own, removed
    after: the set stays mapped), and the masks read per second."""
    cache = tempfile.TemporaryDirectory(prefix="cectl-bench-feed-cache-")
    tempfile.tempdir = cache.name
    try:
        start = time.perf_counter()
        files = open_mask_files(str(folder), 128)
        return files, files.count / (time.perf_counter() - start)
    finally:
        tempfile.tempdir = None
        cache.cleanup()


def holes_per_s(kind: str, batches: int, files: MaskFiles) -> float:
    torch.set_num_threads(1)  # as in a loader process
    holes_for_positions(kind, range(64), 128, 4, 0, files=files)  # one-off set-up
    start = time.perf_counter()
    for b in range(batches):
        holes_for_positions(kind, range(64 * b, 64 * (b + 1)), 128, 4, 0, files=files)
    return 64 * batches / (time.perf_counter() - start)


def emit(report: dict, path: Path | None) -> None:
    """The report as one JSON line, printed and, given a `path`, written there."""
    line = json.dumps(report)
    if path:
        path.write_text(line + "\n")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = tempfile.TemporaryDirectory(prefix="cectl-bench-feed-")
    shards = make_shards(Path(root.name), args.images)
    masks = mask_folder(Path(root.name))
    threads = torch.get_num_threads()
    best: dict = {}

    def record(key: str, value: float, higher: bool = True) -> None:
        keep = max if higher else min
        best[key] = keep(best.get(key, value), value)

    for round_ in range(args.rounds):
        for processes in (1, 2):
            for mode, gpu_layout in (("gpu_layout", True), ("cpu_decode", False)):
                record(f"images_per_s/{mode}/x{processes}",
                       images_per_s(shards, processes, gpu_layout, 40 if gpu_layout else 12))
        for processes in (1, 2, 4):
            record(f"parse_amplification/x{processes}", parse_amplification(shards, processes),
                   higher=False)
        for key, value in thread_us(shards, 12).items():
            record(key, value, higher=False)
        files, read_per_s = read_mask_set(masks)
        record("mask_set_read_per_s", read_per_s)
        for kind in KINDS:
            record(f"holes_per_s/{kind}", holes_per_s(kind, 8, files))
        torch.set_num_threads(threads)
        print(f"round {round_ + 1}: {json.dumps(best)}", file=sys.stderr, flush=True)
    report: dict = {}
    for key, value in best.items():
        *path, leaf = key.split("/")
        node = report
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = round(value, 3 if "amplification" in key else 1)
    root.cleanup()
    emit(report, args.json)


if __name__ == "__main__":
    main()
