"""A training batch on its way from a loader process to the device: packed there into one
tensor whatever the batch size, and unpacked here, with the JPEGs decoded on the GPU.

A loader process plans every sample's crop (`cectl.pixels.plan_crop`) and draws its hole
(`cectl.masks`). With GPU decoding, a baseline JPEG that needs no resize travels as its
bytes, to be decoded by nvJPEG and cut on the GPU; any other sample (a PNG, a progressive
JPEG, one that needs a resize) is decoded and cut in the loader process and travels as
pixels, as every sample does with CPU decoding. Crop plans, pixels, packed holes and JPEG
bytes share one uint8 tensor: receiving a batch costs the training thread one shared
memory handle whatever its size, and reaching the GPU one copy.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import simplejpeg
import torch

from cectl.errors import BadInput, Failure
from cectl.masks import AREA, derive_seed, holes_for_positions, pack_holes, unpack_holes
from cectl.pixels import Crop, cut_sample, plan_crop

if TYPE_CHECKING:
    from cectl.mask_files import MaskFiles

JpegDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # bytes -> (3, H, W) uint8


class PackedBatch(NamedTuple):
    """A batch as a loader process sends it: `data` holds its `Fields` end to end."""

    data: torch.Tensor  # uint8
    count: int  # samples
    encoded: int  # of them, those whose JPEG travels encoded
    size: int  # the images' side
    keys: list[str]
    shards: list[str]


class Fields(NamedTuple):
    """Views of a packed batch's data. Row i of the batch is row `order[i]` of the
    decoded JPEGs' crops followed by `pixels`."""

    crops: torch.Tensor  # int64 (encoded, 7): start, end in `jpegs`, height, width, x, y, flip
    order: torch.Tensor  # int64 (count,)
    pixels: torch.Tensor  # uint8 (count - encoded, 3, size, size): cut in the loader process
    holes: torch.Tensor  # uint8 (count, 1, size, size / 8): masks.pack_holes
    jpegs: torch.Tensor  # uint8: the encoded JPEGs, end to end (last: not copied to a GPU)


def fields(batch: PackedBatch, data: torch.Tensor | None = None) -> Fields:
    """The fields of `batch`, as views of its data or of `data`, a copy of its head."""
    data = batch.data if data is None else data
    n, k, s = batch.count, batch.encoded, batch.size
    ints = data[: 8 * (7 * k + n)].view(torch.int64)
    at = 8 * (7 * k + n)
    pixels = data[at : at + (n - k) * 3 * s * s].view(n - k, 3, s, s)
    at += pixels.numel()
    holes = data[at : at + n * s * -(-s // 8)].view(n, 1, s, -(-s // 8))
    return Fields(ints[: 7 * k].view(k, 7), ints[7 * k :], pixels, holes,
                  data[at + holes.numel() :])


def pack_batch(samples: list[dict], positions: range, seed: int, load_size: int,
               image_size: int, mask_kind: str, overlap: int, gpu_jpegs: bool,
               area: tuple[float, float] = AREA, files: MaskFiles | None = None) -> PackedBatch:
    """The batch of `samples` (at global `positions`): crops and flips seeded per position,
    holes drawn per position (`cectl.masks.holes_for_positions`, with `area` and `files`);
    baseline JPEGs left encoded if `gpu_jpegs`."""
    encoded, crops, cut, rows = [], [], [], ([], [])
    end = 0
    for sample, position in zip(samples, positions, strict=True):
        crop = plan_crop(sample, load_size, image_size,
                         random.Random(derive_seed(seed, "crop", position)))
        if gpu_jpegs and _gpu_decodable(sample, crop):
            encoded.append(sample["jpg"])
            crops.append((end, end + len(sample["jpg"]), crop.height, crop.width, crop.x,
                          crop.y, crop.flip))
            end += len(sample["jpg"])
            rows[0].append(len(rows[0]) + len(rows[1]))
        else:
            cut.append(cut_sample(sample, crop, image_size))
            rows[1].append(len(rows[0]) + len(rows[1]))
    n, k, s = len(samples), len(encoded), image_size
    order = np.empty(n, dtype=np.int64)
    order[rows[0] + rows[1]] = np.arange(n)
    holes = pack_holes(holes_for_positions(mask_kind, positions, s, overlap, seed, area,
                                           files)).numpy()
    ints = np.concatenate([np.array(crops, dtype=np.int64).reshape(-1), order])
    data = np.empty(8 * len(ints) + len(cut) * 3 * s * s + holes.size + end, dtype=np.uint8)
    batch = PackedBatch(torch.from_numpy(data), n, k, s, [x["__key__"] for x in samples],
                        [x["__url__"] for x in samples])
    views = fields(batch)
    data[: 8 * len(ints)] = ints.view(np.uint8)
    for out, array in zip(views.pixels.numpy(), cut, strict=True):
        out[...] = array.transpose(2, 0, 1)
    views.holes.numpy()[...] = holes
    for (start, stop, *_), jpeg in zip(crops, encoded, strict=True):
        views.jpegs.numpy()[start:stop] = np.frombuffer(jpeg, dtype=np.uint8)
    return batch


def _gpu_decodable(sample: dict, crop: Crop) -> bool:
    """A JPEG nvJPEG's batched path decodes (baseline or extended sequential Huffman: its
    hardware path; a progressive one would take its per-image CPU path) and that the crop
    plan takes at its full size (nvJPEG does not decode at 1/2, 1/4 or 1/8 scale), with no
    resize after decoding."""
    if "jpg" not in sample or crop.reduce != 1 or crop.decoded != (crop.height, crop.width):
        return False
    data, i = sample["jpg"], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker in (0xC0, 0xC1):  # start of frame: baseline, extended sequential
            return True
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return False  # another frame type, or the scan began without a frame
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def unpack_batch(batch: PackedBatch, device: torch.device,
                 decoded: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW images, bool holes) on `device`, from a batch whose JPEGs
    `decode_jpegs` decoded into `decoded`: one copy of the batch to the device (from pinned
    memory there: no host sync), the crops cut in one gather."""
    head = batch.data[: batch.data.numel() - len(fields(batch).jpegs)]
    on = fields(batch, head.to(device, non_blocking=True))
    holes = unpack_holes(on.holes, batch.size)
    if not batch.encoded:
        return on.pixels, holes
    images = _cut(decoded, on.crops, batch.size)
    if batch.encoded < batch.count:
        images = torch.cat([images, on.pixels])[on.order]
    return images, holes


def decode_jpegs(batch: PackedBatch, decode: JpegDecoder) -> list[torch.Tensor]:
    """The batch's JPEGs decoded by `decode`, checked against their crop plans; a JPEG the
    decoder fails on is named."""
    if not batch.encoded:
        return []
    host = fields(batch)
    plans = host.crops.tolist()  # host memory: reading it waits for nothing
    jpegs = list(host.jpegs.split([plan[1] - plan[0] for plan in plans]))
    try:
        images = decode(jpegs)
    except (RuntimeError, ValueError) as e:
        if _device_fault(e):
            raise
        for jpeg, name in zip(jpegs, _jpeg_names(batch), strict=True):
            try:
                decode([jpeg])
            except (RuntimeError, ValueError) as one:
                if _device_fault(one):
                    raise
                raise BadInput(f"{name} is not a readable JPEG ({_first_line(one)}): run "
                               "`cectl verify`") from None
        raise Failure(f"decoding a batch of JPEGs failed ({_first_line(e)}), though each "
                      "decodes alone") from None
    sizes = [(3, plan[2], plan[3]) for plan in plans]
    if [tuple(image.shape) for image in images] != sizes:
        for image, size, name in zip(images, sizes, _jpeg_names(batch), strict=True):
            if tuple(image.shape) != size:
                raise BadInput(f"{name} decodes to {tuple(image.shape)}, not the {size} its "
                               "header says: run `cectl verify`")
    return images


def _device_fault(error: Exception) -> bool:
    """The GPU's own error (out of memory, a failed kernel: torchvision words them
    "CUDA ..."), not a JPEG's."""
    return (isinstance(error, torch.OutOfMemoryError | torch.AcceleratorError)
            or "CUDA" in str(error))


def _jpeg_names(batch: PackedBatch) -> list[str]:
    """The names of the batch's encoded samples, in the order of its crop plans."""
    rows = sorted(range(batch.count), key=fields(batch).order.tolist().__getitem__)
    return [f"sample {batch.keys[i]} of shard {batch.shards[i]}"
            for i in rows[: batch.encoded]]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _cut(images: list[torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's crop (and flip) as planned, all in one gather from the images laid
    end to end."""
    height, width, x, y, flip = crops[:, 2:].unbind(1)
    area = height * width
    start = torch.cumsum(3 * area, 0) - 3 * area
    steps = torch.arange(size, device=crops.device)
    columns = torch.where(flip[:, None] == 1, x[:, None] + (size - 1 - steps), x[:, None] + steps)
    rows = (y[:, None] + steps) * width[:, None]
    channels = torch.arange(3, device=crops.device) * area[:, None]
    index = ((start[:, None] + channels)[:, :, None, None] + rows[:, None, :, None]
             + columns[:, None, None, :])
    return torch.take(torch.cat([image.reshape(-1) for image in images]), index)


def cpu_jpegs(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
    """JPEGs decoded whole by the loader's own decoder: the CPU stand-in for nvJPEG."""
    return [torch.from_numpy(simplejpeg.decode_jpeg(jpeg.numpy(), colorspace="RGB"))
            .permute(2, 0, 1) for jpeg in jpegs]


def nvjpeg(device: torch.device) -> JpegDecoder:
    """torchvision's batched nvJPEG decode onto `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB, device=device)


class Unpacker:
    """Packed batches made ready for the step, off the training thread: `unpack` (in the
    loader's input thread) decodes the JPEGs, with nvJPEG on a CUDA device if `gpu_jpegs`,
    and returns `unpack_batch`'s images and holes; `hand_over` (in the training thread,
    when it takes them) makes the training stream wait for that work.

    On a CUDA device all of it runs on a stream of its own, of high priority: from a pool
    apart from the low-priority one a graph's capture stream comes from (`cectl.graph`),
    whose capture the input thread must never touch, and ahead of the step's kernels in
    the GPU's queue. torchvision's batched decode allocates its outputs on the current
    stream but writes them from a private stream that waits for nothing (pytorch/vision
    PR 9606), so it could be handed a block that queued kernels still read: on this
    stream only the previous batch's own kernels read its blocks, and `unpack` waits for
    them on the host first (the input thread's time, not the training thread's). What is
    handed out is recorded on the training stream, so its blocks stay allocated until that
    stream is done with them. bench/gpu.py checks the decode for corruption.
    """

    def __init__(self, device: torch.device, gpu_jpegs: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.decode: JpegDecoder = nvjpeg(device) if self.cuda and gpu_jpegs else cpu_jpegs
        if self.cuda:
            self.main = torch.cuda.current_stream(device)  # the training thread's
            self.stream = torch.cuda.Stream(device, priority=-1)
            self.done = torch.cuda.Event()

    def unpack(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            return unpack_batch(batch, self.device, decode_jpegs(batch, self.decode))
        self.done.synchronize()
        with torch.cuda.stream(self.stream):
            images, holes = unpack_batch(batch, self.device, decode_jpegs(batch, self.decode))
            self.done.record(self.stream)
        for tensor in images, holes:
            tensor.record_stream(self.main)
        return images, holes

    def hand_over(self) -> None:
        """Make the training stream wait for the last `unpack`."""
        if self.cuda:
            self.main.wait_event(self.done)
