"""The training loop: one function for `cectl train --local` and for every Ray worker.

`train()` is the spine: build the networks and optimizers, the loader, the checkpointer
(which restores all of them on `--resume`), the logger and the validator, then step. Per
step: take the next batch with its holes from the loader, update the discriminator on real
and fake windows, then the generator on lambda_rec * reconstruction + lambda_adv *
adversarial (or the reconstruction alone for `loss.mode=rec`). Each component says when
it acts (`should_log`, `should_validate`, `should_save`); rank 0 does the writing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from cectl.checkpoint import Checkpointer
from cectl.claims import Claim
from cectl.config import to_yaml
from cectl.data import SAMPLE_LOG, TrainLoader, batch_shares, debug_log, gpu_decoding
from cectl.graph import GraphedStep
from cectl.losses import adversarial_loss, reconstruction_loss
from cectl.masks import fill_holes, loss_weights, output_window
from cectl.model import build_models, weights_digest
from cectl.monitor import MetricsLogger, Validator
from cectl.pixels import to_model_range
from cectl.runs import Run
from cectl.shard_format import open_manifest
from cectl.storage import Store


@dataclass
class Session:
    """Where a training loop runs and whom it tells (rank 0 calls the hooks)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module  # DDP in Ray workers
    on_log: Callable[[int, dict], None] | None = None  # (step, metrics), each log_every
    on_checkpoint: Callable[[int, dict], None] | None = None  # every rank, after a save


def autocast(precision: str, device: torch.device):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    # No cast cache: each region uses a weight once, and a cache inside a CUDA graph
    # would keep casts from the capture.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@functools.cache
def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` on `device`: `auto` is bf16 where the device computes in bf16
    natively (NVIDIA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), else fp32 (a CPU
    without them emulates bf16, ~30x slower: BENCHMARKS.md)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                     or torch.cpu._is_amx_tile_supported())


def prepare_device(device: torch.device) -> torch.memory_format:
    """Set `device` up for training; the memory format of the networks and batches.

    On a GPU (measured on an H200, BENCHMARKS.md): cuDNN benchmarks its kernels once per
    shape (a step's shapes never change), fp32 matmuls run in TF32, and networks and
    batches are channels_last (bf16: 1.35x the step of NCHW)."""
    if device.type != "cuda":
        return torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    return torch.channels_last


def make_optimizer(module: nn.Module, lr: float, beta1: float) -> torch.optim.Adam:
    # fused Adam: one kernel over all 71M parameters, 7x faster than the default on a CPU;
    # capturable on a GPU, so that a CUDA graph can hold it.
    on_gpu = next(module.parameters()).is_cuda
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(beta1, 0.999), fused=True,
                            capturable=on_gpu)


def train_step(generator: nn.Module, discriminator: nn.Module | None,
               opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None,
               images: torch.Tensor, holes: torch.Tensor, cfg: DictConfig,
               scaler: torch.amp.GradScaler) -> dict[str, torch.Tensor]:
    """One update of D (real, then fake) and then of G; returns the losses, on the device."""
    window = output_window(cfg.data.image_size, cfg.mask.kind)
    target = window.crop(images)
    weights = loss_weights(holes, window, cfg.mask.overlap_weight)
    cast = autocast(cfg.train.precision, images.device)
    with cast:
        fake = generator(fill_holes(images, holes))
    losses = {}
    if discriminator is not None:
        # One backward per forward, real then fake: the gradients add up to those of
        # their sum, and DDP (one reduction per forward) can wrap the discriminator.
        opt_d.zero_grad(set_to_none=True)
        loss_d = []
        for batch, real in ((target, True), (fake.detach(), False)):
            with cast:
                loss = adversarial_loss(discriminator(batch), real)
            scaler.scale(loss).backward()
            loss_d.append(loss.detach())
        scaler.step(opt_d)
        # The generator's adversarial term: the gradients it leaves in D are discarded,
        # so DDP need not average them.
        with getattr(discriminator, "no_sync", contextlib.nullcontext)(), cast:
            loss_adv = adversarial_loss(discriminator(fake), True)
        losses.update(loss_d=loss_d[0] + loss_d[1], loss_adv=loss_adv.detach())
    loss_rec = reconstruction_loss(fake, target, weights)
    loss_g = loss_rec
    if discriminator is not None:
        loss_g = cfg.loss.lambda_rec * loss_rec + cfg.loss.lambda_adv * loss_adv
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    losses["loss_rec"] = loss_rec.detach()
    return losses


def train(cfg: DictConfig, store: Store, run_name: str, session: Session | None = None,
          resume: bool = False, claim: dict | None = None) -> dict | None:
    """Train `run_name` in `store` up to `cfg.train.steps`; rank 0 returns the run's summary.

    Rank 0 holds the run while it trains (a second `cectl train` of it is refused), or,
    given the `claim` record a Ray driver holds for the whole run, writes under that.
    `resume` of a run without a complete checkpoint starts it again from step 0."""
    session = session or Session()
    run = Run(store, run_name)
    if session.rank == 0 and claim is None:
        run.claim(resume)
    elif session.rank == 0:
        run.held = Claim(run, claim)
    try:
        run.check_claim()
        return _train(cfg, run, session, resume and bool(run.steps()))
    finally:
        if run.held is not None:
            run.held.release()


def _train(cfg: DictConfig, run: Run, session: Session, resume: bool) -> dict | None:
    device, rank = session.device, session.rank
    manifest = open_manifest(cfg.data.uri)
    if cfg.train.precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn("this CPU has no native bf16: bf16 runs emulated, far slower than fp32",
                      stacklevel=2)

    layout = prepare_device(device)
    torch.manual_seed(cfg.train.seed)
    generator, discriminator = build_models(cfg)
    generator.to(device, memory_format=layout)
    if discriminator is not None:
        discriminator.to(device, memory_format=layout)
    # As train.lua: the generator learns 10x faster only against a discriminator.
    lr_g = cfg.optim.lr_d * (cfg.optim.lr_ratio if discriminator is not None else 1.0)
    opt_g = make_optimizer(generator, lr_g, cfg.optim.beta1)
    opt_d = (make_optimizer(discriminator, cfg.optim.lr_d, cfg.optim.beta1)
             if discriminator is not None else None)
    loader = TrainLoader(cfg.data.uri, manifest, cfg, rank, session.world, device,
                         gpu_jpegs=gpu_decoding(cfg.data.decode, device))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    checkpointer = Checkpointer(run, cfg, {"G": generator, "D": discriminator},
                                {"G": opt_g, "D": opt_d}, loader, rank, session.world, scaler)
    start = checkpointer.restore() if resume else 0
    g_train = session.wrap(generator)
    d_train = session.wrap(discriminator) if discriminator is not None else None
    step_fn = functools.partial(train_step, g_train, d_train, opt_g, opt_d, cfg=cfg,
                                scaler=scaler)
    if graphable(cfg, session):
        step_fn = GraphedStep(step_fn, before_replay=checkpointer.wait_copy)

    if rank == 0:
        with run.writing():
            run.store.write_bytes("config.yaml", to_yaml(cfg).encode())
    logger = MetricsLogger(run, cfg, session, start)
    validator = Validator(cfg, manifest, session, run, logger, loader.mask_files)
    if resume:
        logger.log(start, checkpointer.resume_metrics())

    metrics: dict[str, float] = {}
    # Nothing below waits for the device but logging, validation and checkpoints: the
    # batch and its holes come from pinned memory, the losses stay on the device.
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            run.check_claim(read=False)  # stop as soon as the heartbeat finds the run taken over
            images, holes = next(loader)
            images = to_model_range(images.contiguous(memory_format=layout))
            losses = step_fn(images, holes)
            if logger.should_log(step):
                metrics = logger.log_losses(step, losses)
            if validator.should_validate(step):
                val = validator.run_at(step, generator)
                logger.log(step, val)
                metrics.update(val)
                checkpointer.track(step, val["val_l2_pct"])
            if checkpointer.should_save(step):
                checkpointer.save(step, metrics)
                logger.flush()
                if session.on_checkpoint:
                    session.on_checkpoint(step, metrics)
    except BaseException as stop:
        # The save in flight finishes while the run is still held (the claim goes after
        # this), so that a --resume starts from it; a failure of its own goes with the
        # reason the run stopped.
        try:
            checkpointer.close()
        except Exception as failed:  # noqa: BLE001 - told beside the reason
            stop.add_note(f"the checkpoint being written failed too: {failed}")
        for part in logger, loader:
            with contextlib.suppress(Exception):
                part.close()
        raise
    checkpointer.close()
    logger.close()
    loader.close()
    if os.environ.get(SAMPLE_LOG):
        networks = [m for m in (generator, discriminator) if m is not None]
        debug_log({"rank": rank, "world": session.world, "step": cfg.train.steps,
                   "weights": weights_digest(*networks)})
    return run.summary() if rank == 0 else None


def graphable(cfg: DictConfig, session: Session) -> bool:
    """Whether the step runs as a CUDA graph: on one GPU, unless `train.cuda_graph=false`;
    fp16's loss scaling reads the gradients on the host, and DDP's reducer is not captured."""
    return (cfg.train.cuda_graph and session.device.type == "cuda" and session.world == 1
            and resolve_precision(cfg.train.precision, session.device) != "fp16")


def describe_batch(cfg: DictConfig, world: int) -> str:
    """The batch at start-up, `effective batch 2 x 8 = 16` or `6 + 5 + 5 = 16`: with more
    workers the recipe changes unless told."""
    shares = batch_shares(cfg, world)
    parts = (f"{world} x {shares[0]}" if len(set(shares)) == 1
             else " + ".join(map(str, shares)))
    text = f"effective batch {parts} = {sum(shares)}"
    if world > 1 and cfg.data.batch_policy == "per-worker":
        text += (f", {world}x the recipe's at the same learning rate "
                 f"(data.batch_policy=global keeps it at {cfg.data.batch_size})")
    return text

