"""GPU figures for issue 10: the step alone, the loader alone, the whole `--local` run.

1. The dcgan128 joint-loss step on synthetic batches already on the device, batch 64 and
   256: the plain eager-fp32 baseline (bench/train_step.py's reference layers, default
   Adam), cectl fp32, bf16 autocast, bf16 + channels_last, bf16 + torch.compile, and
   cectl bf16 through a world-of-one NCCL DDP with bf16 gradient all-reduce (the path of
   Ray workers). images/s, peak GPU memory, and the model FLOPs utilisation against this
   GPU's measured bf16 matmul rate.
2. The loader alone on Paris-like 350 px shards (bench/loader.py's): images/s with 1, 4,
   8 and 16 loader processes (CPU decoding).
3. `cectl train --local` on the same shards (the real loop, loader, logging and
   checkpointing): images/s, and its ratio to the step alone.

Needs a CUDA GPU; `--quick` runs every part small on any device, to check the script.
The GPU image lacks webdataset, omegaconf, boto3 and simplejpeg: carry their wheels.

    python bench/gpu.py [--quick] [--steps 30] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from loader import make_shards
from omegaconf import DictConfig
from train_step import baseline_step, reference_layers

from cectl.config import JobConfig, load_config, validate_job
from cectl.data import TrainLoader, open_manifest, to_float
from cectl.distributed import ddp_wrapper, local_session
from cectl.masks import derive_seed, draw_holes
from cectl.model import build_models
from cectl.storage import open_store
from cectl.train import make_optimizer, train, train_step


def job(batch: int, precision: str, quick: bool, **data) -> DictConfig:
    tiny = ["model.width=8", "model.bottleneck=32", "data.image_size=32",
            "data.load_size=40", "mask.overlap=2"] if quick else []
    return validate_job(load_config(JobConfig, "inpaint-center", tiny + [
        f"data.batch_size={batch}", f"train.precision={precision}",
        "train.log_every=10", "train.eval_every=100000", "train.checkpoint_every=100000"],
        {"data": {"uri": data.get("uri", "unused"), **data}}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(cfg, device: torch.device, steps: int, variant: str) -> dict:
    """images/s and peak memory of `steps` steps of one contender on synthetic data."""
    torch.manual_seed(0)
    g, d = (m.to(device) for m in build_models(cfg))
    if variant == "baseline":
        g = reference_layers(g).to(device)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    else:
        opt_g = make_optimizer(g, 2e-3, 0.5)
        opt_d = make_optimizer(d, 2e-4, 0.5)
    if variant == "channels_last":
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    if variant == "compile":
        g, d = torch.compile(g), torch.compile(d)
    if variant == "ddp":
        wrap = ddp_wrapper(device, "bf16")
        g, d = wrap(g), wrap(d)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    n = cfg.data.batch_size
    images = torch.randint(0, 256, (n, 3, cfg.data.image_size, cfg.data.image_size),
                           dtype=torch.uint8, device=device)
    holes = draw_holes(cfg.mask.kind, n, cfg.data.image_size, cfg.mask.overlap,
                       derive_seed(0, "bench")).to(device)

    def one() -> None:
        x = to_float(images)
        if variant == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if variant == "baseline":
            baseline_step(g, d, opt_g, opt_d, x, holes, cfg)
        else:
            train_step(g, d, opt_g, opt_d, x, holes, cfg, scaler)

    for _ in range(3):  # warm-up (and compilation)
        one()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": steps * n / seconds, "peak_gib": peak}


def flops_per_step(cfg, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    g, d = (m.to(device) for m in build_models(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    n, size = cfg.data.batch_size, cfg.data.image_size
    images = to_float(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                                    device=device))
    holes = draw_holes(cfg.mask.kind, n, size, cfg.mask.overlap, 0).to(device)
    with FlopCounterMode(display=False) as counter:
        train_step(g, d, make_optimizer(g, 1e-3, 0.5), make_optimizer(d, 1e-3, 0.5),
                   images, holes, cfg, scaler)
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, n: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def loader_rate(shards: str, processes: int, batches: int) -> float:
    cfg = job(64, "fp32", False, uri=shards, workers=processes)
    loader = TrainLoader(shards, open_manifest(shards), cfg, 0, 1)
    for _ in range(max(2, processes)):  # every process started and busy
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return 64 * batches / (time.perf_counter() - start)


def whole_run(shards: str, device: torch.device, batch: int, steps: int, quick: bool) -> float:
    cfg = job(batch, "bf16" if device.type == "cuda" else "fp32", quick, uri=shards,
              workers=8 if not quick else 1)
    cfg.train.steps = steps
    store = open_store(tempfile.mkdtemp(prefix="cectl-bench-gpu-"))
    with local_session(cfg, device, lambda step, metrics: None) as session:
        summary = train(cfg, store, "bench", session)
    return summary["metrics"]["images_per_s"]  # the last log window: past the warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = 2 if args.quick else args.steps
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__}
    print(f"device: {report['device']}")

    report["matmul_tflops"] = matmul_tflops(device, 1024 if args.quick else 8192)
    print(f"measured matmul rate: {report['matmul_tflops']:.1f} TFLOP/s")
    report["step"] = {}
    for batch in (8,) if args.quick else (64, 256):
        flops = flops_per_step(job(batch, "fp32", args.quick), device)
        for variant, precision in (("baseline", "fp32"), ("cectl", "fp32"), ("cectl", "bf16"),
                                   ("channels_last", "bf16"), ("compile", "bf16"),
                                   ("ddp", "bf16")):
            if variant == "ddp" and device.type != "cuda":
                continue  # the NCCL path
            cfg = job(batch, precision, args.quick)
            with (local_session(cfg, device, lambda *a: None) if variant == "ddp"
                  else contextlib.nullcontext()):
                result = step_rate(cfg, device, steps, variant)
            result["mfu"] = flops * result["images_per_s"] / batch / 1e12 / report[
                "matmul_tflops"]
            name = f"batch {batch} {variant} {precision}"
            report["step"][name] = result
            peak = f"{result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else "-"
            print(f"{name:32s} {result['images_per_s']:9.0f} images/s  peak {peak:>9s}  "
                  f"MFU {100 * result['mfu']:.1f}%")

    shards = make_shards(Path(tempfile.mkdtemp(prefix="cectl-bench-gpu-")),
                         1 if args.quick else 16)
    report["loader"] = {}
    for processes in (1, 2) if args.quick else (1, 4, 8, 16):
        rate = loader_rate(shards, processes, 4 if args.quick else 100)
        report["loader"][f"cpu x{processes}"] = rate
        print(f"loader, {processes:2d} CPU decoding processes: {rate:9.0f} images/s")

    batch = 8 if args.quick else 256
    report["whole_run"] = whole_run(shards, device, batch, 20 if args.quick else 300,
                                    args.quick)
    step_alone = report["step"][f"batch {batch} cectl {'fp32' if args.quick else 'bf16'}"]
    ratio = report["whole_run"] / step_alone["images_per_s"]
    print(f"cectl train --local, batch {batch}: {report['whole_run']:.0f} images/s = "
          f"{100 * ratio:.0f}% of the step alone")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
