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

Positions only grow, so each loader process meets the shards in order and keeps the
current one open. It reads only its own samples' images, at offsets from the shard's
index, which the machine's `ShardCache` builds once from the tar headers: each byte of a
shard is parsed about once per machine and epoch, whatever the number of processes and
ranks taking shares of it. Shards on S3 are fetched once per machine into the same cache.

Random crops, flips and holes are seeded per sample from its global position, so they do
not depend on the world size either. A loader process plans the crops, draws the holes and
packs the batch (`cectl.batches`); JPEGs are decoded there or, with GPU decoding, here.

Samples follow webdataset's tar rules (`cectl.shard_format.index_tar`), but the read order
is cectl's own: webdataset's shuffles and shard lists keep no state that can be saved and
restored, so they cannot resume mid-epoch at an exact sample, let alone on another world.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cectl.batches import PackedBatch, Unpacker, pack_batch
from cectl.errors import BadInput, CectlError, Failure
from cectl.mask_files import MaskFiles, trained_mask_files
from cectl.masks import derive_seed
from cectl.shard_cache import ShardCache, ShardFile
from cectl.shard_format import ImageEntry
from cectl.storage import Store, open_store

PREFETCH = 4  # batches each loader process keeps ready
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

    `sample(position)` streams: positions asked for in increasing order open each shard
    once, when its first sample is asked for, and read only the images asked for.
    `bytes_read` and `bytes_delivered` count the bytes parsed (tar headers, indexes,
    images) and the image bytes handed out.
    """

    def __init__(self, store: Store, shards: list[dict], seed: int):
        self.store, self.shards, self.seed = store, shards, seed
        self.cache = ShardCache(store)
        self.epoch_len = sum(s["samples"] for s in shards)
        self.bytes_delivered = 0
        self._epoch: tuple[int, list[dict], list[int]] | None = None  # epoch, order, starts
        self._shard: tuple[int, ShardFile, list[ImageEntry]] | None = None  # epoch, file, order

    @property
    def bytes_read(self) -> int:
        return self.cache.bytes_read

    def shard_order(self, epoch: int) -> tuple[list[dict], list[int]]:
        """The shards of an epoch in order, and the position in the epoch each starts at."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = list(self.shards)
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
            starts = list(itertools.accumulate((s["samples"] for s in order), initial=0))
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def sample(self, position: int) -> dict:
        """The sample at `position`: its key, its shard's name and its image's bytes."""
        epoch, offset = divmod(position, self.epoch_len)
        order, starts = self.shard_order(epoch)
        i = bisect.bisect_right(starts, offset) - 1
        shard = order[i]
        if self._shard is None or (self._shard[0], self._shard[1].name) != (epoch, shard["name"]):
            self.close()
            file = self._open(shard)
            if len(file.entries) != shard["samples"]:
                file.close()
                raise BadInput(f"{shard['name']} holds {len(file.entries)} samples, the "
                               f"manifest says {shard['samples']}: run `cectl verify`")
            entries = list(file.entries)
            random.Random(derive_seed(self.seed, shard["name"], epoch)).shuffle(entries)
            self._shard = (epoch, file, entries)
        _, file, entries = self._shard
        entry = entries[offset - starts[i]]
        sample = {"__key__": entry.key, "__url__": file.name}
        if entry.ext:
            with _named_os_errors(self.store, shard):
                sample[entry.ext] = file.image(entry)
            self.bytes_delivered += entry.size
        return sample

    def close(self) -> None:
        """Close the shard open now (a later `sample` opens it again)."""
        if self._shard is not None:
            self._shard[1].close()
            self._shard = None

    def _open(self, shard: dict) -> ShardFile:
        with _named_os_errors(self.store, shard):
            return self.cache.open(shard)


@contextlib.contextmanager
def _named_os_errors(store: Store, shard: dict) -> Iterator[None]:
    """A full disk, a broken link: the cause in one sentence, not a traceback."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise Failure(f"cannot read {store.url(shard['name'])}: {e.strerror or e}{where}"
                      ) from None


class TrainBatches(IterableDataset):
    """One rank's batches (`PackedBatch`); each loader process plays every
    `processes`-th batch from the global position `start` on."""

    def __init__(self, data_uri: str, shards: list[dict], start: int, shares: list[int],
                 rank: int, cfg, gpu_jpegs: bool, mask_files: MaskFiles | None = None):
        super().__init__()
        self.data_uri, self.shards, self.start = data_uri, shards, start
        self.shares, self.rank, self.gpu_jpegs = shares, rank, gpu_jpegs
        self.seed, self.load_size = cfg.train.seed, cfg.data.load_size
        self.image_size, self.mask = cfg.data.image_size, (cfg.mask.kind, cfg.mask.overlap)
        self.holes = {"area": (cfg.mask.min_area, cfg.mask.max_area), "files": mask_files}

    def __iter__(self) -> Iterator[PackedBatch | CectlError]:
        # Errors are passed on as values: raised in a loader process, they would reach the
        # user wrapped in that process's traceback.
        info = get_worker_info()
        process, processes = (info.id, info.num_workers) if info else (0, 1)
        # The batches in flight, and a few more: the last reference to a batch's shared
        # memory frees its pages (~4 us per image), better here than in the training thread.
        sent = collections.deque(maxlen=PREFETCH + 2)
        try:
            # Closed also when the iterator is dropped (a loader without processes, restored
            # to another position): its shard's file with it.
            with contextlib.closing(GlobalOrder(open_store(self.data_uri), self.shards,
                                                self.seed)) as order:
                for batch in self.batches(order, process, processes):
                    sent.append(batch)
                    yield batch
        except CectlError as e:
            yield e
        except Exception as e:
            if os.environ.get("CECTL_DEBUG"):
                raise
            yield Failure(f"unexpected {type(e).__name__} in the loader: {e}")

    def batches(self, order: GlobalOrder, process: int, processes: int) -> Iterator[PackedBatch]:
        """The batches loader process `process` of `processes` plays, read through `order`."""
        global_batch, offset = sum(self.shares), sum(self.shares[:self.rank])
        for k in itertools.count(process, processes):
            first = self.start + k * global_batch + offset
            positions = range(first, first + self.shares[self.rank])
            yield pack_batch([order.sample(p) for p in positions], positions, self.seed,
                             self.load_size, self.image_size, *self.mask, self.gpu_jpegs,
                             **self.holes)


def gpu_decoding(mode: str, device: torch.device) -> bool:
    """`data.decode` for this device: whether batches are decoded on the GPU."""
    available = device.type == "cuda" and importlib.util.find_spec("torchvision") is not None
    if mode == "gpu" and not available:
        raise BadInput("data.decode=gpu needs a CUDA GPU and torchvision "
                       "(pip install 'cectl[gpu]'); use data.decode=cpu or auto")
    return mode == "gpu" or (mode == "auto" and available)


class TrainLoader:
    """Batches for one rank: (uint8 NCHW images, bool holes) on `device`. Its state, the
    number of samples the whole job has consumed (`{"samples": N}`), is the data position
    a checkpoint saves and restores.

    With `gpu_jpegs`, loader processes leave baseline JPEGs encoded and they are decoded
    here: by nvJPEG on a CUDA device, by the loader's own CPU decoder elsewhere. A thread
    of the loader's own works one batch ahead of the training thread: while a step runs,
    it receives the next batch from the loader processes, decodes its JPEGs and unpacks
    it (`cectl.batches.Unpacker`), so the training thread only takes it.
    With `mask.kind=files` it opens the mask set (`mask_files`), read into this machine's
    cache by the first rank here, and its loader processes map it.
    """

    def __init__(self, data_uri: str, manifest: dict, cfg, rank: int, world: int,
                 device: torch.device | None = None, gpu_jpegs: bool = False):
        self.data_uri, self.cfg, self.rank, self.world = data_uri, cfg, rank, world
        self.device, self.gpu_jpegs = device or torch.device("cpu"), gpu_jpegs
        self.unpacker = Unpacker(self.device, gpu_jpegs)
        self.shards = train_shards(manifest)
        self.shares = batch_shares(cfg, world)
        self.mask_files = trained_mask_files(cfg) if cfg.mask.kind == "files" else None
        self.samples = 0
        self.positions = range(0)  # global positions of the batch handed out last
        self._iter: Iterator | None = None
        on_device = None
        if self.device.type == "cuda":  # a new thread is on GPU 0: it would make a context there
            index = self.device.index
            on_device = functools.partial(torch.cuda.set_device,
                                          torch.cuda.current_device() if index is None else index)
        self._input = ThreadPoolExecutor(1, thread_name_prefix="cectl-input",
                                         initializer=on_device)
        self._ahead: Future | None = None

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
        self._drop_iterator()
        self.samples = int(state["samples"])

    def close(self) -> None:
        """Stop the input thread and the loader processes; the batch in flight is dropped."""
        self._drop_iterator()
        self._input.shutdown()

    def _drop_iterator(self) -> None:
        """Let the batch in flight finish, then drop it and the iterator (the loader
        processes end with it)."""
        if self._ahead is not None:
            wait([self._ahead])
        self._iter = self._ahead = None

    def _start(self) -> Iterator:
        cfg = self.cfg
        dataset = TrainBatches(self.data_uri, self.shards, self.samples, self.shares,
                               self.rank, cfg, self.gpu_jpegs, self.mask_files)
        # Its own generator: every random draw of the pipeline is seeded from the data
        # position, and the global RNG (dropout, a checkpoint's RNG state) stays untouched.
        # Pinned pages let the copies to a GPU run without blocking the input thread.
        return iter(DataLoader(dataset, batch_size=None, num_workers=cfg.data.workers,
                               prefetch_factor=PREFETCH if cfg.data.workers else None,
                               pin_memory=self.device.type == "cuda",
                               generator=torch.Generator().manual_seed(cfg.train.seed)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
            self._ahead = self._input.submit(self._prepare, self.samples)
        images, holes, keys, positions = self._ahead.result()
        self.unpacker.hand_over()
        self.positions = positions
        self.samples += sum(self.shares)
        debug_log({"rank": self.rank, "world": self.world, "position": positions.start,
                   "keys": keys})
        self._ahead = self._input.submit(self._prepare, self.samples)
        return images, holes

    def _prepare(self, samples: int) -> tuple[torch.Tensor, torch.Tensor, list[str], range]:
        """In the input thread: the next batch from the loader processes, unpacked."""
        item = next(self._iter)
        if isinstance(item, CectlError):
            raise item
        first = samples + sum(self.shares[:self.rank])
        images, holes = self.unpacker.unpack(item)
        return images, holes, item.keys, range(first, first + len(item.keys))
