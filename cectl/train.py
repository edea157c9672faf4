"""The training loop: one function for `cectl train --local` and for every Ray worker.

Per step: draw this step's masks, update the discriminator on real and fake windows,
then the generator on lambda_rec * reconstruction + lambda_adv * adversarial (or the
reconstruction alone for `loss.mode=rec`). Rank 0 logs, draws sample grids, evaluates
and writes checkpoints; `--resume` continues exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cectl.checkpoint import Run, collect_tensors, load_checkpoint, restore_tensors
from cectl.config import to_yaml
from cectl.data import TrainLoader, load_eval_images, open_manifest, to_float, worker_batch
from cectl.evaluate import evaluate
from cectl.losses import adversarial_loss, reconstruction_loss
from cectl.masks import derive_seed, draw_holes, fill_holes, loss_weights, output_window
from cectl.model import build_models, complete
from cectl.storage import LocalStore, open_store

SAMPLE_COLUMNS = 8


@dataclass
class Session:
    """Where a training loop runs and whom it tells (rank 0 calls the hooks)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module  # DDP in Ray workers
    on_log: Callable[[int, dict], None] | None = None  # (step, metrics), each log_every
    on_checkpoint: Callable[[int, dict], None] | None = None  # every rank, after a save


class TrainProgress:
    """A live display of step, images/s, losses and ETA, fed with `update(step, metrics)`."""

    def __init__(self, console: Console, total: int):
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[rate]} img/s  {task.fields[losses]}"),
            TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("train", total=total, rate="-", losses="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        if "resumed" in metrics:
            self.progress.console.print(f"resuming from step {step}")
        fields = {}
        if "images_per_s" in metrics:
            fields["rate"] = f"{metrics['images_per_s']:,.1f}"
            fields["losses"] = "  ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                                         if k.startswith("loss_"))
        self.progress.update(self.task, completed=step, **fields)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(module: nn.Module, lr: float, beta1: float) -> torch.optim.Adam:
    # fused Adam: one kernel over all 71M parameters, 7x faster than the default on a CPU.
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(beta1, 0.999), fused=True)


def train_step(generator: nn.Module, discriminator: nn.Module | None,
               opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None,
               images: torch.Tensor, holes: torch.Tensor, cfg: DictConfig,
               scaler: torch.amp.GradScaler) -> dict[str, float]:
    """One update of D (real, then fake) and then of G; returns the losses."""
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
        loss_d = 0.0
        for batch, real in ((target, True), (fake.detach(), False)):
            with cast:
                loss = adversarial_loss(discriminator(batch), real)
            scaler.scale(loss).backward()
            loss_d += loss.item()
        scaler.step(opt_d)
        # The generator's adversarial term: the gradients it leaves in D are discarded,
        # so DDP need not average them.
        with getattr(discriminator, "no_sync", contextlib.nullcontext)(), cast:
            loss_adv = adversarial_loss(discriminator(fake), True)
        losses.update(loss_d=loss_d, loss_adv=loss_adv.item())
    loss_rec = reconstruction_loss(fake, target, weights)
    loss_g = loss_rec
    if discriminator is not None:
        loss_g = cfg.loss.lambda_rec * loss_rec + cfg.loss.lambda_adv * loss_adv
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    losses["loss_rec"] = loss_rec.item()
    return losses


def sample_grid(inputs: torch.Tensor, completed: torch.Tensor, truth: torch.Tensor) -> bytes:
    """PNG with three rows: input with hole | prediction | truth."""
    rows = [torch.cat(list(t[:SAMPLE_COLUMNS]), dim=2) for t in (inputs, completed, truth)]
    grid = torch.cat(rows, dim=1).add(1).mul(127.5).clamp(0, 255).byte()
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(buf, "PNG")
    return buf.getvalue()


class _Validator:
    """A fixed held-out batch: sample grids and the val metrics used for `best`."""

    def __init__(self, cfg: DictConfig, manifest: dict, device: torch.device):
        split = "val" if "val" in manifest["splits"] else "train"
        self.cfg, self.device = cfg, device
        self.images, _ = load_eval_images(cfg.data.uri, split, cfg.data.image_size,
                                          limit=min(64, max(SAMPLE_COLUMNS, cfg.data.batch_size)))

    @torch.no_grad()
    def run(self, generator: nn.Module) -> tuple[dict[str, float], bytes]:
        generator.eval()
        try:
            result = evaluate(generator, self.cfg, self.images, self.cfg.mask.kind,
                              device=self.device)
            truth = to_float(self.images[:SAMPLE_COLUMNS].to(self.device))
            holes = draw_holes(self.cfg.mask.kind, len(truth), self.cfg.data.image_size,
                               self.cfg.mask.overlap, derive_seed(self.cfg.train.seed, "grid"))
            holes = holes.to(self.device)
            window = output_window(self.cfg.data.image_size, self.cfg.mask.kind)
            _, completed = complete(generator, truth, holes, window.offset)
            png = sample_grid(fill_holes(truth, holes), completed, truth)
        finally:
            generator.train()
        metrics = {f"val_{k}": v for k, v in result["model"].items()}
        return metrics, png


class _Logger:
    """metrics.jsonl on the store and TensorBoard events next to it (rank 0 only)."""

    def __init__(self, run: Run, lines: list[str],
                 on_log: Callable[[int, dict], None] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.lines, self.on_log = run, lines, on_log
        if isinstance(run.store, LocalStore):
            self.tb_dir = run.store.path("tensorboard")
        else:  # written locally, uploaded with each checkpoint
            self.tb_dir = Path(tempfile.mkdtemp(prefix="cectl-tb-"))
        self.writer = SummaryWriter(str(self.tb_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.lines.append(json.dumps({"step": step, **metrics}))
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if self.on_log:
            self.on_log(step, metrics)

    def flush(self) -> None:
        self.run.store.write_bytes("metrics.jsonl", ("\n".join(self.lines) + "\n").encode())
        self.writer.flush()
        if not isinstance(self.run.store, LocalStore):
            for path in self.tb_dir.iterdir():
                self.run.store.put_file(path, f"tensorboard/{path.name}")

    def close(self) -> None:
        self.flush()
        self.writer.close()


def train(cfg: DictConfig, store_uri: str, run_name: str, session: Session | None = None,
          resume: bool = False) -> dict:
    """Train `run_name` in `store_uri` up to `cfg.train.steps`; returns a summary."""
    session = session or Session()
    device, rank = session.device, session.rank
    run = Run(open_store(store_uri), run_name)
    manifest = open_manifest(cfg.data.uri)
    if cfg.train.precision == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        warnings.warn("this CPU has no native bf16: bf16 runs emulated, far slower than fp32",
                      stacklevel=2)

    torch.manual_seed(cfg.train.seed)
    generator, discriminator = build_models(cfg)
    generator.to(device)
    if discriminator is not None:
        discriminator.to(device)
    # As train.lua: the generator learns 10x faster only against a discriminator.
    lr_g = cfg.optim.lr_d * (cfg.optim.lr_ratio if discriminator is not None else 1.0)
    opt_g = make_optimizer(generator, lr_g, cfg.optim.beta1)
    opt_d = (make_optimizer(discriminator, cfg.optim.lr_d, cfg.optim.beta1)
             if discriminator is not None else None)

    start, rng_state, lines, best = 0, None, [], (None, float("inf"))
    if resume:
        tensors, state = load_checkpoint(run.checkpoint("latest"))
        restore_tensors(tensors, {"G": generator, "D": discriminator}, {"G": opt_g, "D": opt_d})
        start, rng_state = state["step"], tensors["rng.torch"]
        best = (state.get("best_step"), state.get("best_val", float("inf")))
        if rank == 0 and run.store.exists("metrics.jsonl"):
            lines = [line for line in run.store.read_bytes("metrics.jsonl").decode().splitlines()
                     if line and json.loads(line)["step"] <= start]
    g_train, d_train = session.wrap(generator), (session.wrap(discriminator)
                                                 if discriminator is not None else None)

    # Every step consumes one batch on every rank, so the step is the data position.
    loader = TrainLoader(cfg.data.uri, manifest, cfg, rank, session.world, batches=start)
    if rng_state is not None:  # after the loader, which draws its worker seeds from it
        torch.set_rng_state(rng_state)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    logger = validator = None
    if rank == 0:
        run.store.write_bytes("config.yaml", to_yaml(cfg).encode())
        logger = _Logger(run, lines, session.on_log)
        validator = _Validator(cfg, manifest, device)
        if resume:
            logger.log(start, {"resumed": 1})

    batch = worker_batch(cfg, session.world)
    t_start = t_window = time.perf_counter()
    window_steps, last = 0, {}
    for step in range(start + 1, cfg.train.steps + 1):
        images = to_float(next(loader).to(device, non_blocking=True))
        holes = draw_holes(cfg.mask.kind, len(images), cfg.data.image_size,
                           cfg.mask.overlap, derive_seed(cfg.train.seed, "mask", rank, step))
        losses = train_step(g_train, d_train, opt_g, opt_d, images, holes.to(device), cfg, scaler)
        window_steps += 1
        final = step == cfg.train.steps
        if step % cfg.train.log_every == 0 or final:
            now = time.perf_counter()
            rate = window_steps * batch * session.world / (now - t_window)
            t_window, window_steps = now, 0
            last = {**losses, "images_per_s": rate}
            if logger:
                logger.log(step, last)
        if validator and (step % cfg.train.eval_every == 0 or final):
            val, png = validator.run(generator)
            run.store.write_bytes(f"samples/step-{step:06d}.png", png)
            logger.log(step, val)
            last.update(val)
            if val["val_l2_pct"] < best[1]:
                best = (step, val["val_l2_pct"])
        if step % cfg.train.checkpoint_every == 0 or final:
            if rank == 0:  # only rank 0 writes model files; its buffers are the checkpoint's
                state = {"step": step, "data_position": {"batches": loader.batches},
                         "config": OmegaConf.to_container(cfg), "metrics": last,
                         "best_step": best[0], "best_val": best[1]}
                tensors = collect_tensors({"G": generator, "D": discriminator},
                                          {"G": opt_g, "D": opt_d})
                run.save(step, tensors, state)
                logger.flush()
            if session.on_checkpoint:
                session.on_checkpoint(step, last)
    if logger:
        logger.close()
    seconds = time.perf_counter() - t_start
    done = cfg.train.steps - start
    return {"run": run_name, "steps": cfg.train.steps, "trained_steps": done,
            "seconds": seconds, "images_per_s": done * batch * session.world / max(seconds, 1e-9),
            "metrics": last, "checkpoints": run.store.url("checkpoints"),
            "models": (generator, discriminator)}


def describe_batch(cfg: DictConfig, world: int) -> str:
    """The start-up line on the batch: with more workers the recipe changes unless told."""
    batch = worker_batch(cfg, world)
    text = f"effective batch {world} x {batch} = {world * batch}"
    if world > 1 and cfg.data.batch_policy == "per-worker":
        text += (f", {world}x the recipe's at the same learning rate "
                 f"(data.batch_policy=global keeps it at {cfg.data.batch_size})")
    return text


def _cpu_has_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX", "AVX512_AMX")
