"""Batches between loader processes and the device: packing, unpacking, GPU decoding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import assert_refused, encode, tiny_job
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from cectl.batches import (
    _gpu_decodable,
    cpu_jpegs,
    decode_jpegs,
    fields,
    pack_batch,
    unpack_batch,
)
from cectl.data import GlobalOrder, TrainBatches, TrainLoader, batch_shares, train_shards
from cectl.errors import BadInput
from cectl.masks import derive_seed, holes_for_positions
from cectl.pixels import cut_sample, plan_crop, to_model_range
from cectl.shard_format import open_manifest
from cectl.storage import open_store

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def encoded(size: tuple[int, int], fmt: str = "JPEG", **options) -> bytes:
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), fmt, **options)


def mixed_samples() -> list[dict]:
    """Samples of every kind: a baseline JPEG of the load size (decoded on the GPU), a
    progressive one, a PNG and a JPEG that needs a resize (decoded in the loader)."""
    kinds = [("jpg", encoded((48, 40), quality=90)),
             ("jpg", encoded((40, 52), quality=90, progressive=True)),
             ("png", encoded((44, 40), "PNG")),
             ("jpg", encoded((100, 90), quality=90)),
             ("jpg", encoded((40, 40), quality=90))]
    return [{"__key__": f"s{i}", "__url__": "train/shard-000000.tar", ext: data}
            for i, (ext, data) in enumerate(kinds)]


def expected_crops(samples: list[dict], positions: range) -> torch.Tensor:
    crops = [cut_sample(s, plan_crop(s, 40, 32, random.Random(derive_seed(0, "crop", p))), 32)
             for s, p in zip(samples, positions, strict=True)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)


def test_gpu_decoding_gets_baseline_jpegs_that_need_no_resize():
    samples = mixed_samples()
    plans = [plan_crop(s, 40, 32, random.Random(0)) for s in samples]
    assert [_gpu_decodable(s, c) for s, c in zip(samples, plans, strict=True)] == [
        True, False, False, False, True]


def test_a_jpeg_planned_at_a_reduced_scale_is_decoded_in_the_loader():
    """Its 1/2 scale is the load size, so no resize follows; nvJPEG would decode it whole."""
    sample = {"__key__": "big", "__url__": "train/shard-000000.tar",
              "jpg": encoded((80, 100), quality=90)}
    plan = plan_crop(sample, 40, 32, random.Random(0))
    assert (plan.reduce, plan.decoded) == (2, (plan.height, plan.width))
    assert not _gpu_decodable(sample, plan)
    batch = pack_batch([sample], range(3, 4), 0, 40, 32, "center", 2, gpu_jpegs=True)
    assert batch.encoded == 0
    images, _ = unpack_batch(batch, torch.device("cpu"), decode_jpegs(batch, cpu_jpegs))
    assert torch.equal(images, expected_crops([sample], range(3, 4)))


@pytest.mark.parametrize("kind", ["random-block", "free-form"])
def test_a_mixed_batch_unpacks_to_the_loaders_own_crops_in_order(kind):
    samples, positions = mixed_samples(), range(100, 105)
    area = (0.3, 0.5)
    batch = pack_batch(samples, positions, 0, 40, 32, kind, 2, gpu_jpegs=True, area=area)
    assert batch.encoded == 2 and len(fields(batch).pixels) == 3
    images, holes = unpack_batch(batch, torch.device("cpu"), decode_jpegs(batch, cpu_jpegs))
    assert torch.equal(images, expected_crops(samples, positions))
    assert torch.equal(holes, holes_for_positions(kind, positions, 32, 2, 0, area=area))


def test_a_batch_is_one_tensor_whatever_its_size():
    samples = mixed_samples() * 8
    for count in (5, 40):
        batch = pack_batch(samples[:count], range(count), 0, 40, 32, "center", 2,
                           gpu_jpegs=True)
        assert [type(field) for field in batch if isinstance(field, torch.Tensor)] == [
            torch.Tensor]
        assert fields(batch).holes.numel() == count * 32 * 32 // 8  # a bit per pixel


def test_a_jpeg_the_decoder_fails_on_is_named():
    samples = mixed_samples()
    batch = pack_batch(samples, range(5), 0, 40, 32, "center", 2, gpu_jpegs=True)
    start, stop = fields(batch).crops[1, :2].tolist()
    bad = bytes(fields(batch).jpegs[start:stop].tolist())

    def stub(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:  # as nvJPEG fails: the batch
        if any(bytes(j.tolist()) == bad for j in jpegs):
            raise RuntimeError("nvjpegDecodeBatched failed: NVJPEG_STATUS_BAD_JPEG\nmore")
        return cpu_jpegs(jpegs)

    with pytest.raises(BadInput) as caught:
        decode_jpegs(batch, stub)
    assert_refused(caught.value, 2, "sample s4", "train/shard-000000.tar",
                   "NVJPEG_STATUS_BAD_JPEG", "cectl verify")


@pytest.mark.parametrize("fault", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
    RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 700")])
def test_a_gpu_fault_while_decoding_is_not_blamed_on_a_jpeg(fault):
    batch = pack_batch(mixed_samples(), range(5), 0, 40, 32, "center", 2, gpu_jpegs=True)

    def stub(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise fault

    with pytest.raises(type(fault)) as caught:
        decode_jpegs(batch, stub)
    assert caught.value is fault


def test_a_jpeg_decoded_to_another_size_than_its_header_is_named():
    batch = pack_batch(mixed_samples(), range(5), 0, 40, 32, "center", 2, gpu_jpegs=True)

    def stub(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [image[:, 1:] for image in cpu_jpegs(jpegs)]

    with pytest.raises(BadInput) as caught:
        decode_jpegs(batch, stub)
    assert_refused(caught.value, 2, "sample s0", "decodes to")


def test_loader_processes_parse_each_byte_about_once_whatever_their_number(facade_shards,
                                                                          tmp_path,
                                                                          monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # no index built by an earlier test
    monkeypatch.setattr(tempfile, "tempdir", None)
    cfg = tiny_job(facade_shards, "data.batch_size=4")
    manifest = open_manifest(facade_shards)
    shards, shares = train_shards(manifest), batch_shares(cfg, 1)
    epoch = sum(s["samples"] for s in shards)
    parsed = {}
    for processes in (1, 4, 16):  # 16 > shard size / batch: every process in every shard
        dataset = TrainBatches(facade_shards, shards, 0, shares, 0, cfg, gpu_jpegs=True)
        read = delivered = 0
        for process in range(processes):
            order = GlobalOrder(open_store(facade_shards), shards, 0)
            batches = dataset.batches(order, process, processes)
            for _ in range(process, -(-epoch // 4), processes):
                next(batches)
            read, delivered = read + order.bytes_read, delivered + order.bytes_delivered
        parsed[processes] = (read, delivered)
    # Each image is read once; the headers are indexed once per machine (tiny images
    # here: the headers weigh a quarter of the images).
    assert len({delivered for _, delivered in parsed.values()}) == 1
    read, delivered = parsed[1]
    assert delivered < read < 1.3 * delivered
    assert parsed[4][0] < read + 0.05 * delivered and parsed[16][0] < read + 0.1 * delivered


class ReadsOnHost(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (`.item()`, `bool()`, ...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_no_tensor_value_on_the_host(facade_shards):
    from cectl.model import build_models
    from cectl.train import make_optimizer, train_step

    cfg = tiny_job(facade_shards, "data.workers=1", "data.load_size=72",
                   "mask.kind=random-region")
    loader = TrainLoader(facade_shards, open_manifest(facade_shards), cfg, 0, 1,
                         gpu_jpegs=True)
    generator, discriminator = build_models(cfg)
    opt_g, opt_d = make_optimizer(generator, 1e-3, 0.5), make_optimizer(discriminator, 1e-3, 0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    next(loader)
    with ReadsOnHost() as mode:
        for _ in range(2):  # as the loop: receive, unpack, step
            images, holes = next(loader)
            train_step(generator, discriminator, opt_g, opt_d, to_model_range(images), holes,
                       cfg, scaler)
    assert mode.reads == []


@CUDA
def test_nvjpeg_on_its_stream_decodes_the_loaders_pixels(facade_shards):
    from cectl.batches import Unpacker

    device = torch.device("cuda")
    batch = pack_batch(mixed_samples(), range(5), 0, 40, 32, "center", 2, gpu_jpegs=True)
    unpacker = Unpacker(device, gpu_jpegs=True)
    images, _ = unpacker.unpack(batch)
    unpacker.hand_over()
    cpu, _ = Unpacker(torch.device("cpu"), gpu_jpegs=True).unpack(batch)
    # nvJPEG's IDCT and chroma upsampling round a little differently from libjpeg-turbo.
    assert (images.cpu().int() - cpu.int()).abs().float().mean() < 2


@CUDA
def test_the_training_loop_waits_for_the_gpu_only_to_log(facade_shards):
    import warnings

    from cectl.model import build_models
    from cectl.train import make_optimizer, prepare_device, train_step

    device = torch.device("cuda")
    cfg = tiny_job(facade_shards, "data.workers=2", "mask.kind=random-region")
    layout = prepare_device(device)
    loader = TrainLoader(facade_shards, open_manifest(facade_shards), cfg, 0, 1, device)
    generator, discriminator = (m.to(device, memory_format=layout) for m in build_models(cfg))
    opt_g, opt_d = make_optimizer(generator, 1e-3, 0.5), make_optimizer(discriminator, 1e-3, 0.5)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def step() -> None:
        images, holes = next(loader)
        images = to_model_range(images.contiguous(memory_format=layout))
        train_step(generator, discriminator, opt_g, opt_d, images, holes, cfg, scaler)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [str(w.message) for w in caught] == []
