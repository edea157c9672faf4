"""`cectl eval`: the paper's Table 1 metrics on the hole region, next to a mean-colour fill.

Pixels in [0, 1]. Mean L1 and mean L2 in % are averaged over every dropped pixel and
channel; PSNR in dB is computed per image on its hole and averaged over images.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from omegaconf import DictConfig
from rich.table import Table
from torch import nn

from cectl.data import load_eval_images, to_float
from cectl.masks import check_window, derive_seed, draw_holes, fill_holes, output_window
from cectl.model import complete
from cectl.storage import Store

EVAL_SEED = 1234  # random masks in evaluation are the same for every checkpoint


def hole_metrics(completed: torch.Tensor, truth: torch.Tensor,
                 holes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image L1, L2 (fractions) and PSNR over the hole; inputs in [-1, 1]."""
    diff = (completed.float() - truth.float()) / 2 * holes  # [0, 1] scale
    pixels = (holes.flatten(1).sum(1) * truth.shape[1]).clamp_min(1)
    l1 = diff.abs().flatten(1).sum(1) / pixels
    l2 = diff.square().flatten(1).sum(1) / pixels
    return {"l1": l1, "l2": l2, "psnr": 10 * torch.log10(1 / l2.clamp_min(1e-10))}


def summarize(per_image: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    l1, l2, psnr = (torch.cat(per_image[k]) for k in ("l1", "l2", "psnr"))
    return {"l1_pct": 100 * l1.mean().item(), "l2_pct": 100 * l2.mean().item(),
            "psnr_db": psnr.mean().item()}


@torch.no_grad()
def evaluate(generator: nn.Module, cfg: DictConfig, images: torch.Tensor, mask_kind: str,
             batch_size: int = 32, device: torch.device | None = None) -> dict:
    """Metrics of the model and of the mean fill over uint8 NCHW `images`."""
    device = device or torch.device("cpu")
    size = cfg.data.image_size
    window = output_window(size, cfg.mask.kind)
    per_image: dict[str, dict[str, list]] = {"model": defaultdict(list),
                                             "mean_fill": defaultdict(list)}
    for start in range(0, len(images), batch_size):
        truth = to_float(images[start : start + batch_size].to(device))
        holes = draw_holes(mask_kind, len(truth), size, cfg.mask.overlap,
                           derive_seed(EVAL_SEED, start)).to(device)
        check_window(holes, window, cfg.mask.kind)
        _, completed = complete(generator, truth, holes, window.offset)
        for name, result in (("model", completed), ("mean_fill", fill_holes(truth, holes))):
            for key, value in hole_metrics(result, truth, holes).items():
                per_image[name][key].append(value.cpu())
    return {"images": len(images), "mask": mask_kind,
            **{name: summarize(values) for name, values in per_image.items()}}


def evaluate_checkpoint(ckpt: Store, data_uri: str, split: str = "val",
                        mask: str | None = None) -> dict:
    """Load a checkpoint and score it on a split (mask: the one it trained with by default)."""
    from cectl.checkpoint import load_generator

    generator, cfg, state = load_generator(ckpt)
    images, _ = load_eval_images(data_uri, split, cfg.data.image_size)
    result = evaluate(generator, cfg, images, mask or cfg.mask.kind)
    return {**result, "checkpoint": ckpt.uri, "step": state["step"], "split": split}


def score_table(result: dict, title: str) -> Table:
    """The model's scores next to the mean fill's, for the terminal."""
    table = Table(title=title)
    for column in ("", "mean L1 %", "mean L2 %", "PSNR dB"):
        table.add_column(column, justify="right")
    for label, key in (("context encoder", "model"), ("mean-colour fill", "mean_fill")):
        m = result[key]
        table.add_row(label, f"{m['l1_pct']:.2f}", f"{m['l2_pct']:.2f}", f"{m['psnr_db']:.2f}")
    return table
