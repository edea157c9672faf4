"""GPU figures: the step alone, GPU JPEG decoding, the loop's host syncs, the loader alone,
the whole `--local` run.

Runs on a bare GPU host with the repo and a wheel bundle (`../shared/gpu/wheels.sh`); it
makes its own images and finds `cectl` without PYTHONPATH. Parts, in order, the JSON
rewritten after each so a late failure loses nothing:

1. `step`: the dcgan128 joint-loss step on synthetic batches already on the device, batch
   64 and 256: the plain eager-fp32 baseline (bench/train_step.py's reference layers,
   default Adam, no tuning), then with cectl's GPU set-up (`prepare_device`:
   cudnn.benchmark, TF32 matmuls) fp32 and bf16 autocast, each in NCHW and channels_last,
   and bf16 channels_last as a CUDA graph (cectl's default on one GPU: `cectl.graph`).
   images/s, peak GPU memory, MFU against this GPU's measured bf16 matmul rate; then
   `graph_check`: the weights after 10 steps launched kernel by kernel and as a graph.
   `profile`: the operators that take the most device time in that step at batch 256
   (bf16, channels_last, kernel by kernel), from torch.profiler.
2. `decode`: torchvision's batched nvJPEG decode of 256 JPEGs while queued kernels still
   write blocks the caching allocator has freed: iterations whose output differs from a
   clean one, for the plain call, cectl's (`cectl.batches.Unpacker`: its own stream, a
   barrier on it before each decode, the crops cut; the traps on its stream) and the
   plain call after a host barrier; and each one's images/s.
3. `syncs`: the training loop's body (next batch from the loader with GPU decoding and
   random-region holes, float conversion, the graphed step) for steady-state steps under
   `torch.cuda.set_sync_debug_mode("warn")`: every host sync it makes (target: none).
4. `loader`: the loader alone on 467x350 JPEG shards (batch 64), 1, 4, 8, 16 processes,
   CPU decode and GPU decode.
5. `whole_run`: `cectl train --local` at batch 256 (the real loop, loader, logging), GPU
   decode with and without the CUDA graph and with the loader's input thread replaced by
   a call in place (`Inline`, as before that thread), CPU decode, with center holes, and
   GPU decode with random-region holes: images/s over the log windows of the second half
   of 600 steps, and the share of the step alone.
   `split` (not by default): trials for the whole run, center and random-region holes: a
   share of the JPEGs (20, 35, 50%) decoded by the loader processes instead of nvJPEG.
6. `compile`: bf16 + channels_last + torch.compile, batch 64 and 256 (last: compiling is
   slow).

    python3 bench/gpu.py [--quick] [--steps 50] [--parts step,syncs,...] [--json OUT.json]

`--quick` runs every part small on any device, to check the script (GPU-only parts skip).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cectl, without PYTHONPATH

import torch  # noqa: E402
from feed import make_shards  # noqa: E402
from mask_runs import run_rate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from train_step import baseline_step, reference_layers  # noqa: E402

from cectl import batches, data  # noqa: E402
from cectl.batches import Unpacker, fields, nvjpeg, pack_batch  # noqa: E402
from cectl.config import load_config, validate_job  # noqa: E402
from cectl.data import TrainLoader, gpu_decoding  # noqa: E402
from cectl.graph import GraphedStep  # noqa: E402
from cectl.masks import derive_seed, draw_holes  # noqa: E402
from cectl.model import build_models  # noqa: E402
from cectl.pixels import to_model_range  # noqa: E402
from cectl.schema import JobConfig  # noqa: E402
from cectl.shard_format import open_manifest, read_manifest, read_samples  # noqa: E402
from cectl.storage import open_store  # noqa: E402
from cectl.train import make_optimizer, prepare_device, train_step  # noqa: E402


def job(batch: int, precision: str, quick: bool, **data) -> DictConfig:
    tiny = ["model.width=8", "model.bottleneck=32", "data.image_size=32",
            "data.load_size=40", "mask.overlap=2"] if quick else []
    mask = data.pop("mask", "center")
    return validate_job(load_config(JobConfig, "inpaint-center", tiny + [
        f"data.batch_size={batch}", f"train.precision={precision}", f"mask.kind={mask}",
        "train.log_every=10", "train.eval_every=100000", "train.checkpoint_every=100000"],
        {"data": {"uri": data.get("uri", "unused"), **data}}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(cfg, device: torch.device, variant: str):
    """(G, D, their optimizers) for a variant: baseline, nchw, channels_last, graph, compile."""
    torch.manual_seed(0)
    g, d = (m.to(device) for m in build_models(cfg))
    if variant == "baseline":
        g = reference_layers(g).to(device)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    else:
        opt_g = make_optimizer(g, 2e-3, 0.5)
        opt_d = make_optimizer(d, 2e-4, 0.5)
    if variant in ("channels_last", "graph", "compile"):
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    if variant == "compile":
        g, d = torch.compile(g), torch.compile(d)
    return g, d, opt_g, opt_d


def cectl_step(cfg, device: torch.device, networks: tuple, graphed: bool):
    """cectl's step over (G, D, their optimizers), replayed as a CUDA graph if `graphed`."""
    step = functools.partial(train_step, *networks, cfg=cfg,
                             scaler=torch.amp.GradScaler(device.type, enabled=False))
    return GraphedStep(step, before_replay=lambda: None) if graphed else step


def step_rate(cfg, device: torch.device, steps: int, variant: str) -> dict:
    """images/s and peak memory of `steps` steps of one contender on synthetic data."""
    networks = models(cfg, device, variant)
    images, holes = synthetic_batch(cfg, device)
    layout = torch.contiguous_format if variant in ("baseline", "nchw") else torch.channels_last
    step = (functools.partial(baseline_step, *networks, cfg=cfg) if variant == "baseline"
            else cectl_step(cfg, device, networks, graphed=variant == "graph"))

    def one() -> None:
        step(to_model_range(images.contiguous(memory_format=layout)), holes)

    for _ in range(5):  # warm-up (compilation, cudnn.benchmark's search, the graph's capture)
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
    return {"images_per_s": steps * cfg.data.batch_size / seconds,
            "ms_per_step": 1000 * seconds / steps, "peak_gib": peak}


def graph_check(cfg, device: torch.device, steps: int) -> dict:
    """The weights after `steps` steps from the same start on the same batches, launched
    kernel by kernel and replayed as a CUDA graph: their largest difference."""
    weights, losses = [], []
    for graphed in (False, True):
        networks = models(cfg, device, "graph")
        step = cectl_step(cfg, device, networks, graphed)
        draws = torch.Generator(device).manual_seed(1)
        n, size = cfg.data.batch_size, cfg.data.image_size
        holes = draw_holes(cfg.mask.kind, n, size, cfg.mask.overlap, 0).to(device)
        for _ in range(steps):
            images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                                   device=device, generator=draws)
            last = step(to_model_range(images.contiguous(memory_format=torch.channels_last)),
                        holes)
        weights.append(torch.cat([p.detach().flatten().float() for p in networks[0].parameters()]))
        losses.append({k: float(v) for k, v in last.items()})
    eager, graphed = weights
    return {"steps": steps, "bitwise_equal": bool(torch.equal(eager, graphed)),
            "max_abs_diff": float((eager - graphed).abs().max()),
            "max_abs_weight": float(eager.abs().max()), "losses": losses}


def flops_per_step(cfg, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    g, d, opt_g, opt_d = models(cfg, device, "nchw")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    images, holes = synthetic_batch(cfg, device)
    with FlopCounterMode(display=False) as counter:
        train_step(g, d, opt_g, opt_d, to_model_range(images), holes, cfg, scaler)
    return counter.get_total_flops()


def synthetic_batch(cfg, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, holes) of the job's batch and size, on the device."""
    n, size = cfg.data.batch_size, cfg.data.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    holes = draw_holes(cfg.mask.kind, n, size, cfg.mask.overlap, derive_seed(0, "bench"))
    return images, holes.to(device)


def step_profile(cfg, device: torch.device, steps: int, top: int = 15) -> list[dict]:
    """The operators that take the most device time (CPU time on a CPU) in cectl's step
    launched kernel by kernel (a graph's replay hides its kernels from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step = cectl_step(cfg, device, models(cfg, device, "channels_last"), graphed=False)
    images, holes = synthetic_batch(cfg, device)

    def one() -> None:
        step(to_model_range(images.contiguous(memory_format=torch.channels_last)), holes)

    for _ in range(3):
        one()
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            one()
        sync(device)
    rows = [(e.self_device_time_total if cuda else e.self_cpu_time_total, e)
            for e in prof.key_averages()]
    total = sum(t for t, _ in rows)
    return [{"op": e.key, "ms_per_step": t / steps / 1000, "share": t / total,
             "calls_per_step": e.count / steps}
            for t, e in sorted(rows, key=lambda r: r[0], reverse=True)[:top]]


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


def loop_syncs(shards: str, device: torch.device, batch: int, quick: bool, steps: int) -> dict:
    """Host syncs in steady-state iterations of the training loop's body, as train runs
    it: the loader (GPU decoding where torchvision is, random-region holes), float
    conversion, the step."""
    cfg = job(batch, "auto", quick, uri=shards, workers=4, mask="random-region")
    layout = prepare_device(device)
    loader = TrainLoader(shards, open_manifest(shards), cfg, 0, 1, device,
                         gpu_jpegs=gpu_decoding(cfg.data.decode, device))
    step = cectl_step(cfg, device, models(cfg, device, "graph"), graphed=True)

    def one() -> None:
        images, holes = next(loader)
        step(to_model_range(images.contiguous(memory_format=layout)), holes)

    for _ in range(5):
        one()
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                one()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # The mode announces itself as a prototype once: that warning is not a sync.
    caught = [w for w in caught if "debug mode is a prototype" not in str(w.message)]
    messages = sorted({f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}"
                       for w in caught})
    return {"steps": steps, "syncs": len(caught), "gpu_decode": loader.gpu_jpegs,
            "where": messages}


def decode_check(device: torch.device, samples: list[dict], iterations: int) -> dict:
    """Corrupted iterations and images/s of three ways to decode a batch of JPEGs with
    torchvision's batched nvJPEG: the plain call, cectl's (`Unpacker`, which also cuts the
    crops) and the plain call after a host barrier."""
    batch = pack_batch(samples, range(len(samples)), 0, 350, 128, "center", 4, gpu_jpegs=True)
    decode = nvjpeg(device)
    packed = fields(batch)
    jpegs = list(packed.jpegs.split([int(e - s) for s, e, *_ in packed.crops]))
    unpacker = Unpacker(device, gpu_jpegs=True)

    def plain() -> list[torch.Tensor]:
        return decode(jpegs)

    def cectl() -> list[torch.Tensor]:
        images, _ = unpacker.unpack(batch)
        unpacker.hand_over()
        return list(images)

    def barrier() -> list[torch.Tensor]:
        torch.cuda.current_stream(device).synchronize()
        return plain()

    sizes = [t.numel() for t in decode(jpegs)]
    source = torch.full((max(sizes),), 7, dtype=torch.uint8, device=device)
    slow = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    report = {}
    for name, call in (("plain", plain), ("cectl", cectl), ("barrier", barrier)):
        clean = [t.clone() for t in call()]
        sync(device)
        bad = 0
        # The stream the decode allocates from: cectl's own, where the previous batch's
        # kernels are the ones queued (its barrier waits for them), or the caller's.
        stream = unpacker.stream if name == "cectl" else torch.cuda.current_stream(device)
        for _ in range(iterations):
            # Kernels queued behind slow work write blocks sized like the decoder's
            # outputs; the blocks are freed before those writes run.
            with torch.cuda.stream(stream):
                for _ in range(4):
                    slow @ slow
                blocks = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
                for block in blocks:
                    block.copy_(source[: block.numel()])
                del blocks
                if name == "cectl":
                    unpacker.done.record(stream)  # as the previous batch's last kernels
            out = call()
            sync(device)
            bad += any(not torch.equal(a, b) for a, b in zip(out, clean, strict=True))
        sync(device)
        start, reps = time.perf_counter(), 10
        for _ in range(reps):
            call()
        sync(device)
        rate = reps * len(jpegs) / (time.perf_counter() - start)
        report[name] = {"corrupted": bad, "iterations": iterations, "images_per_s": rate}
        print(f"  decode {name:8s} corrupted {bad:3d}/{iterations}  {rate:8.0f} images/s",
              flush=True)
    return report


def shard_samples(shards: str, count: int) -> list[dict]:
    store = open_store(shards)
    out = []
    for shard in read_manifest(store)["splits"]["train"]["shards"]:
        for sample in read_samples(store, shard["name"]):
            out.append({**sample, "__url__": shard["name"]})
            if len(out) == count:
                return out
    return out


def loader_rate(shards: str, processes: int, count: int, device: torch.device,
                gpu_decode: bool) -> float:
    cfg = job(64, "auto", False, uri=shards, workers=processes)
    loader = TrainLoader(shards, open_manifest(shards), cfg, 0, 1, device, gpu_jpegs=gpu_decode)
    for _ in range(max(2, processes)):  # every process started and busy
        next(loader)
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        next(loader)
    sync(device)
    return 64 * count / (time.perf_counter() - start)


def whole_run(shards: str, device: torch.device, batch: int, steps: int, quick: bool,
              decode: str, mask: str, graph: bool, changes: tuple = ()) -> float:
    """images/s of `cectl train --local`, with `changes` ((object, attribute, value): cectl
    as it was, or a trial) in place meanwhile."""
    cfg = job(batch, "auto", quick, uri=shards, workers=8 if not quick else 1, decode=decode,
              mask=mask)
    cfg.train.steps, cfg.train.cuda_graph = steps, graph
    with contextlib.ExitStack() as undo:
        for owner, attribute, value in changes:  # loader processes fork: they inherit it
            undo.callback(setattr, owner, attribute, getattr(owner, attribute))
            setattr(owner, attribute, value)
        return run_rate(cfg, device)


class Inline:
    """In place of the loader's input thread: each batch made ready on the training
    thread, when it takes the one before (the loader before it had that thread)."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, function, *args) -> Future:
        future = Future()
        try:
            future.set_result(function(*args))
        except BaseException as e:  # noqa: BLE001 - handed over as the thread would
            future.set_exception(e)
        return future


def cpu_share(share: float):
    """A trial: the loader processes decode `share` of the JPEGs nvJPEG would take."""
    gpu_decodable = batches._gpu_decodable

    def decodable(sample: dict, crop) -> bool:
        return (gpu_decodable(sample, crop)
                and derive_seed("bench", sample["__key__"]) % 1000 >= 1000 * share)

    return (batches, "_gpu_decodable", decodable)


class Report:
    """The figures so far, rewritten to the JSON file after each part."""

    def __init__(self, path: Path | None, **head):
        self.path, self.data = path, dict(head)

    def part(self, key: str, value) -> None:
        self.data[key] = value
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=2))

    @contextlib.contextmanager
    def guard(self, key: str):
        """Run one part; if it fails, record why and go on to the next (the lease is short)."""
        try:
            yield
        except Exception as e:
            traceback.print_exc()
            self.part(f"{key}_error", f"{type(e).__name__}: {e}")


def step_line(name: str, result: dict) -> None:
    peak = f"{result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else "-"
    print(f"  {name:36s} {result['images_per_s']:9.0f} images/s {result['ms_per_step']:8.2f}"
          f" ms  peak {peak:>10s}  MFU {100 * result['mfu']:.1f}%", flush=True)


PARTS = ("step", "profile", "decode", "syncs", "loader", "whole_run", "split", "compile")
DEFAULT_PARTS = tuple(part for part in PARTS if part != "split")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"which parts, comma-separated, of {','.join(PARTS)} (default: "
                             f"{','.join(DEFAULT_PARTS)})")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {','.join(sorted(parts - set(PARTS)))}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    steps = 2 if args.quick else args.steps
    report = Report(args.json, device=torch.cuda.get_device_name(device) if cuda else "cpu",
                    torch=torch.__version__)
    print(f"device: {report.data['device']}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    report.part("matmul_tflops", matmul_tflops(device, 1024 if args.quick else 8192))
    print(f"measured bf16 matmul rate: {report.data['matmul_tflops']:.1f} TFLOP/s", flush=True)

    batch_sizes = (8,) if args.quick else (64, 256)
    flops = {b: flops_per_step(job(b, "fp32", args.quick), device) for b in batch_sizes}
    report.part("gflop_per_image", {b: flops[b] / b / 1e9 for b in batch_sizes})
    steps_report: dict = {}

    def measure(batch: int, variant: str, precision: str, label: str) -> None:
        result = step_rate(job(batch, precision, args.quick), device, steps, variant)
        result["mfu"] = flops[batch] * result["images_per_s"] / batch / 1e12 / report.data[
            "matmul_tflops"]
        name = f"batch {batch} {label}"
        steps_report[name] = result
        step_line(name, result)
        report.part("step", steps_report)

    if "step" in parts:
        print("step alone (synthetic batches on the device):", flush=True)
        for batch in batch_sizes:
            measure(batch, "baseline", "fp32", "baseline eager fp32")
    layout = prepare_device(device)  # cectl's set-up from here on
    print(f"cectl's device set-up: cudnn.benchmark={torch.backends.cudnn.benchmark}, "
          f"TF32 matmuls={torch.backends.cuda.matmul.fp32_precision}, {layout}", flush=True)
    for batch in batch_sizes if "step" in parts else ():
        for variant, precision, label in (
                ("nchw", "fp32", "cectl fp32"), ("channels_last", "fp32", "cectl fp32 cl"),
                ("nchw", "bf16", "cectl bf16"), ("channels_last", "bf16", "cectl bf16 cl"),
                ("graph", "bf16", "cectl bf16 cl graph")):
            if variant != "graph" or cuda:
                measure(batch, variant, precision, label)
    if cuda and "step" in parts:
        with report.guard("graph_check"):
            report.part("graph_check", graph_check(job(batch_sizes[0], "bf16", args.quick),
                                                   device, 10))
            print(f"eager vs CUDA graph, 10 steps: {report.data['graph_check']}", flush=True)

    if "profile" in parts:
        with report.guard("profile"):
            report.part("profile", step_profile(job(batch_sizes[-1], "bf16", args.quick), device,
                                                steps))
            print(f"where cectl's bf16 channels_last step spends its time, batch "
                  f"{batch_sizes[-1]}:", flush=True)
            for row in report.data["profile"]:
                print(f"  {row['ms_per_step']:8.3f} ms {100 * row['share']:5.1f}% "
                      f"x{row['calls_per_step']:<5.0f} {row['op'][:80]}", flush=True)

    if not parts & {"decode", "syncs", "loader", "whole_run", "split"}:
        shards = ""
    else:
        root = Path(tempfile.mkdtemp(prefix="cectl-bench-gpu-"))
        start = time.perf_counter()
        shards = make_shards(root, 100 if args.quick else 1600, workers=8)
        print(f"generated and sharded images in {time.perf_counter() - start:.0f} s", flush=True)

    if cuda and gpu_decoding("auto", device) and "decode" in parts:
        print("GPU decode of 256 JPEGs while freed blocks are still being written:")
        with report.guard("decode"):
            report.part("decode", decode_check(device, shard_samples(shards, 256),
                                               10 if args.quick else 50))

    if cuda and "syncs" in parts:
        with report.guard("syncs"):
            report.part("syncs", loop_syncs(shards, device, batch_sizes[-1], args.quick, 5))
            print(f"host syncs in 5 loop iterations: {report.data['syncs']}", flush=True)

    loader: dict = {}
    decodes = (False, True) if gpu_decoding("auto", device) else (False,)
    for gpu_decode in decodes if "loader" in parts else ():
        mode = "gpu" if gpu_decode else "cpu"
        for processes in (1, 2) if args.quick else (1, 4, 8, 16):
            with report.guard(f"loader {mode} x{processes}"):
                rate = loader_rate(shards, processes, 4 if args.quick else 100, device,
                                   gpu_decode)
                loader[f"{mode} decode x{processes}"] = rate
                report.part("loader", loader)
                print(f"loader, {mode} decode, {processes:2d} processes: {rate:9.0f} images/s",
                      flush=True)

    batch = batch_sizes[-1]
    default = "bf16 cl graph" if cuda else "fp32 cl"  # the step cectl runs here
    alone = steps_report.get(f"batch {batch} cectl {default}", {}).get("images_per_s")
    runs = {}
    kinds = [("", "auto", "center", True, ())]
    kinds += [(", input on the training thread", "auto", "center", True,
               ((data, "ThreadPoolExecutor", Inline),)),
              (", no CUDA graph", "auto", "center", False, ())] * cuda
    kinds += [("", "cpu", "center", True, ())] * gpu_decoding("auto", device)
    kinds += [("", "auto", "random-region", True, ())]
    if "whole_run" not in parts:
        kinds = []
    if gpu_decoding("auto", device) and "split" in parts:
        kinds += [(f", trial: {share:.0%} of the JPEGs decoded by the loader processes",
                  "auto", mask, True, (cpu_share(share),))
                 for mask in ("center", "random-region") for share in (0.2, 0.35, 0.5)]
    for trial, decode, mask, graph, changes in kinds:
        name = f"decode {decode}, {mask} holes{trial}"
        with report.guard(f"whole_run {name}"):
            rate = whole_run(shards, device, batch, 20 if args.quick else 600, args.quick,
                             decode, mask, graph, changes)
            runs[name] = {"images_per_s": rate}
            share = ""
            if alone:
                runs[name]["share_of_step"] = rate / alone
                share = f" = {100 * rate / alone:.0f}% of the step alone"
            report.part("whole_run", runs)
            print(f"cectl train --local, batch {batch}, {name}: {rate:.0f} images/s{share}",
                  flush=True)

    if "compile" in parts:
        print("bf16 + channels_last + torch.compile:", flush=True)
    for batch in batch_sizes if "compile" in parts else ():
        with report.guard(f"compile {batch}"):
            measure(batch, "compile", "bf16", "cectl bf16 cl compile")
    report.part("seconds", time.perf_counter() - t0)
    print(f"done in {report.data['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
