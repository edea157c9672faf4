"""What a training run records as it goes: metrics.jsonl and TensorBoard (losses, images/s,
validation metrics as scalars; sample grids as images), and the validations themselves.

Rank 0 writes; the other ranks' loggers and validators stay idle. Every write first checks
the run's claim, so a process that lost its run writes nothing more.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from cectl.data import batch_shares
from cectl.evaluate import evaluate
from cectl.masks import derive_seed, draw_holes, fill_holes, output_window
from cectl.model import complete
from cectl.pixels import load_eval_images, to_model_range, to_pixels
from cectl.runs import Run

if TYPE_CHECKING:
    from cectl.mask_files import MaskFiles
    from cectl.train import Session

SAMPLE_COLUMNS = 8


def sample_grid(*rows: torch.Tensor) -> torch.Tensor:
    """One row per batch in [-1, 1] (input with hole, prediction, truth...), as uint8 CHW."""
    return to_pixels(torch.cat([torch.cat(list(t[:SAMPLE_COLUMNS]), dim=2) for t in rows], dim=1))


def png_bytes(grid: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(buf, "PNG")
    return buf.getvalue()


class Validator:
    """A fixed held-out batch: sample grids (a PNG and a TensorBoard image) and the val
    metrics that pick `best` (rank 0)."""

    def __init__(self, cfg: DictConfig, manifest: dict, session: Session, run: Run,
                 logger: MetricsLogger, mask_files: MaskFiles | None = None):
        self.cfg, self.device, self.run, self.logger = cfg, session.device, run, logger
        self.mask_files = mask_files  # the set of mask.kind=files
        self.active = session.rank == 0
        self.every, self.final = cfg.train.eval_every, cfg.train.steps
        if self.active:
            split = "val" if "val" in manifest["splits"] else "train"
            self.images, _ = load_eval_images(cfg.data.uri, split, cfg.data.image_size,
                                              limit=min(64, max(SAMPLE_COLUMNS,
                                                                cfg.data.batch_size)))

    def should_validate(self, step: int) -> bool:
        return self.active and (step % self.every == 0 or step == self.final)

    @torch.no_grad()
    def run_at(self, step: int, generator: nn.Module) -> dict[str, float]:
        """Score the held-out batch and store a sample grid; the `val_*` metrics."""
        cfg = self.cfg
        generator.eval()
        try:
            result = evaluate(generator, cfg, self.images, cfg.mask.kind, device=self.device,
                              files=self.mask_files)
            truth = to_model_range(self.images[:SAMPLE_COLUMNS].to(self.device))
            holes = draw_holes(cfg.mask.kind, len(truth), cfg.data.image_size,
                               cfg.mask.overlap, derive_seed(cfg.train.seed, "grid"),
                               (cfg.mask.min_area, cfg.mask.max_area), self.mask_files)
            holes = holes.to(self.device)
            window = output_window(cfg.data.image_size, cfg.mask.kind)
            _, completed = complete(generator, truth, holes, window.offset)
            grid = sample_grid(fill_holes(truth, holes), completed, truth)
        finally:
            generator.train()
        with self.run.writing():
            self.run.store.write_bytes(f"samples/step-{step:06d}.png", png_bytes(grid))
        self.logger.log_grid(step, grid)
        return {f"val_{k}": v for k, v in result["model"].items()}


class MetricsLogger:
    """metrics.jsonl with TensorBoard events next to it, and the on_log hook (rank 0).

    Losses stay on the device between logs: reading them is a host sync, so it happens
    only at a log step.
    """

    def __init__(self, run: Run, cfg: DictConfig, session: Session, start: int):
        self.run, self.on_log = run, session.on_log
        self.active = session.rank == 0
        self.every, self.final = cfg.train.log_every, cfg.train.steps
        self.images_per_step = sum(batch_shares(cfg, session.world))
        self.window = (start, time.perf_counter())
        self.lines: list[str] = []
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        if start and run.store.exists("metrics.jsonl"):  # drop what came after the checkpoint
            self.lines = [line for line in run.store.read_bytes("metrics.jsonl")
                          .decode(errors="replace").splitlines() if _step(line) <= start]
        # TensorBoard writes to a folder: the store's own on disk, else a local one
        # uploaded with each checkpoint.
        self.tb_local = run.store.local_path("tensorboard")
        self.tb_dir = self.tb_local or Path(tempfile.mkdtemp(prefix="cectl-tb-"))
        self.writer = SummaryWriter(str(self.tb_dir))

    def should_log(self, step: int) -> bool:
        return self.active and (step % self.every == 0 or step == self.final)

    def log_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Log this step's losses and the images/s since the last log; returns them."""
        # Read first: reading waits for the device, so each window runs from the end of
        # one step to the end of another, not from when the host queued them.
        metrics = {k: float(v) for k, v in losses.items()}
        last_step, last_time = self.window
        now = time.perf_counter()
        self.window = (step, now)
        metrics["images_per_s"] = (step - last_step) * self.images_per_step / (now - last_time)
        self.log(step, metrics)
        return metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.lines.append(json.dumps({"step": step, **metrics}))
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if self.on_log:
            self.on_log(step, metrics)

    def log_grid(self, step: int, grid: torch.Tensor) -> None:
        """A sample grid (uint8 CHW) as a TensorBoard image, beside its PNG."""
        self.writer.add_image("samples", grid, step)

    def flush(self) -> None:
        if not self.active:
            return
        with self.run.writing():
            self.run.store.write_bytes("metrics.jsonl", ("\n".join(self.lines) + "\n").encode())
        self.writer.flush()
        if self.tb_local is None:
            for path in self.tb_dir.iterdir():
                with self.run.writing():
                    self.run.store.put_file(path, f"tensorboard/{path.name}")

    def close(self) -> None:
        self.flush()
        if self.active:
            self.writer.close()


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; a line that is not one of cectl's (damaged, cut
    short by a crash) is dropped on resume, as if after the checkpoint."""
    with contextlib.suppress(ValueError, RecursionError):
        record = json.loads(line)
        if isinstance(record, dict) and type(record.get("step")) is int:
            return record["step"]
    return math.inf
