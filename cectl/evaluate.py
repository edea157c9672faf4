"""`cectl eval`: the paper's Table 1 metrics on the dropped pixels, next to two baselines.

The paper does not state how its averages are taken; cectl's convention, pixels in [0, 1]:
- `l1_pct`, `l2_pct`: mean absolute / squared error over every dropped pixel and channel
  of every image (pooled).
- `psnr_db`: PSNR of each image on its dropped pixels, averaged over images (the number
  in the table). `--json` adds two variants: `psnr_pooled_db`, the PSNR of `l2_pct`, and
  `psnr_window_db`, per-image PSNR over the model's whole output window (for a center
  model the 64x64 window, whose overlap band keeps the true context).

Baselines: the mean-colour fill, and for center masks nearest-neighbour inpainting as in
sec. 5.1 ("NN-inpainting, our features"): each image takes the hole of the train image
whose context, fed through the model's own encoder, is closest (cosine), pasted as is.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cectl.masks import Window, check_window, derive_seed, draw_holes, fill_holes, output_window
from cectl.model import complete
from cectl.pixels import load_eval_images, split_batches, to_model_range
from cectl.shard_format import read_manifest
from cectl.storage import Store, open_store

EVAL_SEED = 1234  # random masks in evaluation are the same for every checkpoint


def hole_metrics(completed: torch.Tensor, truth: torch.Tensor, holes: torch.Tensor,
                 window: Window) -> dict[str, torch.Tensor]:
    """Per image: error sums and pixel count on the hole, PSNR on the hole and on the window.

    Inputs in [-1, 1]; errors on the [0, 1] scale.
    """
    diff = (completed.float() - truth.float()) / 2
    pixels = holes.flatten(1).sum(1) * truth.shape[1]
    squared = (diff * holes).square().flatten(1).sum(1)
    window_l2 = window.crop(diff).square().flatten(1).mean(1)
    return {"abs": (diff * holes).abs().flatten(1).sum(1), "squared": squared, "pixels": pixels,
            "psnr": psnr(squared / pixels.clamp_min(1)), "psnr_window": psnr(window_l2)}


def psnr(l2: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / l2.clamp_min(1e-10))


def summarize(per_image: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    total = {k: torch.cat(v) for k, v in per_image.items()}
    pixels = total["pixels"].sum().clamp_min(1)
    l2 = total["squared"].sum() / pixels
    return {"l1_pct": 100 * (total["abs"].sum() / pixels).item(), "l2_pct": 100 * l2.item(),
            "psnr_db": total["psnr"].mean().item(), "psnr_pooled_db": psnr(l2).item(),
            "psnr_window_db": total["psnr_window"].mean().item()}


def eval_holes(mask_kind: str, n: int, size: int, overlap: int, start: int) -> torch.Tensor:
    """The masks of images start..start+n: the same for every checkpoint."""
    return draw_holes(mask_kind, n, size, overlap, derive_seed(EVAL_SEED, start))


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
        truth = to_model_range(images[start : start + batch_size].to(device))
        holes = eval_holes(mask_kind, len(truth), size, cfg.mask.overlap, start).to(device)
        check_window(holes, window, cfg.mask.kind)
        _, completed = complete(generator, truth, holes, window.offset)
        for name, result in (("model", completed), ("mean_fill", fill_holes(truth, holes))):
            for key, value in hole_metrics(result, truth, holes, window).items():
                per_image[name][key].append(value.cpu())
    return {"images": len(images), "mask": mask_kind,
            **{name: summarize(values) for name, values in per_image.items()}}


@torch.no_grad()
def nearest_neighbour(generator: nn.Module, cfg: DictConfig, images: torch.Tensor,
                      data_uri: str, batch_size: int = 32,
                      device: torch.device | None = None) -> dict[str, float]:
    """Center-mask NN inpainting from the train split, scored like the model; the
    features are computed on `device`."""
    device = device or torch.device("cpu")
    size = cfg.data.image_size
    window = output_window(size, cfg.mask.kind)
    holes = eval_holes("center", 1, size, cfg.mask.overlap, 0)

    def features(batch: torch.Tensor) -> torch.Tensor:
        filled = fill_holes(to_model_range(batch.to(device)), holes.to(device))
        return F.normalize(generator.encoder(filled).flatten(1), dim=1)

    queries = torch.cat([features(images[i : i + batch_size])
                         for i in range(0, len(images), batch_size)])
    best = torch.full((len(images),), -2.0)
    matches = torch.zeros_like(images)
    for candidates, _ in split_batches(data_uri, "train", size, batch_size):
        score, index = (queries @ features(candidates).T).max(dim=1)
        score, index = score.cpu(), index.cpu()
        better = score > best
        best[better] = score[better]
        matches[better] = candidates[index[better]]
    truth = to_model_range(images)
    pasted = torch.where(holes, to_model_range(matches), truth)
    metrics = hole_metrics(pasted, truth, holes.expand(len(images), -1, -1, -1), window)
    return summarize({k: [v] for k, v in metrics.items()})


def evaluate_checkpoint(ckpt: Store, data_uri: str, split: str = "val",
                        mask: str | None = None) -> dict:
    """Load a checkpoint and score it on a split (mask: the one it trained with by default),
    with the nearest-neighbour baseline where it applies (center masks, a train split); on
    the GPU when there is one."""
    from cectl.checkpoint import load_generator
    from cectl.runs import best_device

    generator, cfg, state = load_generator(ckpt)
    device = best_device()
    generator.to(device)
    images, _ = load_eval_images(data_uri, split, cfg.data.image_size)
    result = evaluate(generator, cfg, images, mask or cfg.mask.kind, device=device)
    splits = read_manifest(open_store(data_uri))["splits"]
    if result["mask"] == "center" and split != "train" and "train" in splits:
        result["nearest_neighbour"] = nearest_neighbour(generator, cfg, images, data_uri,
                                                        device=device)
    return {**result, "checkpoint": ckpt.uri, "step": state["step"], "split": split}
