"""`cectl eval`: the paper's Table 1 metrics on the dropped pixels, next to two baselines,
with the metrics inpainting work has added since.

The paper does not state how its averages are taken; cectl's convention, pixels in [0, 1]:
- `l1_pct`, `l2_pct`: mean absolute / squared error over every dropped pixel and channel
  of every image (pooled).
- `psnr_db`: PSNR of each image on its dropped pixels, averaged over images (the number
  in the table). `--json` adds two variants: `psnr_pooled_db`, the PSNR of `l2_pct`, and
  `psnr_window_db`, per-image PSNR over the model's whole output window (for a center
  model the 64x64 window, whose overlap band keeps the true context).
Added, over the model's output window (the whole image for random masks): `ssim` per image
(Wang et al. 2004: 11x11 Gaussian window, sigma 1.5), averaged; with the user's weights
(cectl.perceptual) `lpips` per image, averaged, and `fid` of the set against the truth.

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
from torchmetrics.functional.image import structural_similarity_index_measure

from cectl.errors import BadInput
from cectl.mask_files import MaskFiles, image_masks, trained_mask_files
from cectl.masks import (
    AREA,
    KINDS,
    Window,
    check_window,
    derive_seed,
    draw_holes,
    fill_holes,
    output_window,
)
from cectl.model import complete
from cectl.perceptual import LPIPS_MIN_WINDOW, FrechetDistance, Perceptual
from cectl.pixels import load_eval_images, split_batches, to_model_range, to_pixels
from cectl.shard_format import read_manifest
from cectl.storage import Store, open_store

EVAL_SEED = 1234  # random masks in evaluation are the same for every checkpoint
SSIM_WIDTH, SSIM_SIGMA = 11, 1.5  # torchmetrics' Gaussian is 11 px across at sigma 1.5


def hole_metrics(completed: torch.Tensor, truth: torch.Tensor, holes: torch.Tensor,
                 window: Window, lpips: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Per image: error sums and pixel count on the hole, PSNR on the hole and on the
    window, SSIM (and LPIPS, given its network) on the window.

    Inputs in [-1, 1]; errors on the [0, 1] scale.
    """
    diff = (completed.float() - truth.float()) / 2
    pixels = holes.flatten(1).sum(1) * truth.shape[1]
    squared = (diff * holes).square().flatten(1).sum(1)
    window_l2 = window.crop(diff).square().flatten(1).mean(1)
    ours, real = window.crop(completed.float()), window.crop(truth.float())
    metrics = {"abs": (diff * holes).abs().flatten(1).sum(1), "squared": squared,
               "pixels": pixels, "psnr": psnr(squared / pixels.clamp_min(1)),
               "psnr_window": psnr(window_l2), "ssim": ssim(ours, real)}
    if lpips is not None:
        metrics["lpips"] = lpips(ours, real).flatten()
    return metrics


def psnr(l2: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / l2.clamp_min(1e-10))


def ssim(completed: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of [-1, 1] images on the [0, 1] scale. The Gaussian (11 px across at
    sigma 1.5) shrinks with windows narrower than 11 px, so that it fits them."""
    sigma = SSIM_SIGMA * min(1.0, truth.shape[-1] / SSIM_WIDTH)
    return structural_similarity_index_measure(
        completed.add(1).div(2), truth.add(1).div(2), gaussian_kernel=True, sigma=sigma,
        data_range=1.0, reduction="none")


def summarize(per_image: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    total = {k: torch.cat(v) for k, v in per_image.items()}
    pixels = total["pixels"].sum().clamp_min(1)
    l2 = total["squared"].sum() / pixels
    summary = {"l1_pct": 100 * (total["abs"].sum() / pixels).item(), "l2_pct": 100 * l2.item(),
               "psnr_db": total["psnr"].mean().item(), "psnr_pooled_db": psnr(l2).item(),
               "psnr_window_db": total["psnr_window"].mean().item(),
               "ssim": total["ssim"].mean().item()}
    if "lpips" in total:
        summary["lpips"] = total["lpips"].mean().item()
    return summary


class Scores:
    """Each row's per-image metrics (the model, each baseline), batch by batch, and with
    FID its output windows, scored together at the end."""

    def __init__(self, window: Window, images: torch.Tensor, perceptual: Perceptual | None):
        self.window = window
        self.lpips = perceptual.lpips if perceptual else None
        self.fid = (FrechetDistance(perceptual.inception, window.crop(images))
                    if perceptual and perceptual.inception else None)
        self.per_image: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.windows: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, row: str, completed: torch.Tensor, truth: torch.Tensor,
            holes: torch.Tensor) -> None:
        for key, value in hole_metrics(completed, truth, holes, self.window,
                                       self.lpips).items():
            self.per_image[row][key].append(value.cpu())
        if self.fid:
            self.windows[row].append(to_pixels(self.window.crop(completed)).cpu())

    def summaries(self) -> dict[str, dict[str, float]]:
        result = {row: summarize(values) for row, values in self.per_image.items()}
        for row, windows in self.windows.items():
            result[row]["fid"] = self.fid(torch.cat(windows))
        return result


def eval_holes(mask_kind: str, n: int, size: int, overlap: int, start: int,
               area: tuple[float, float] = AREA, files: MaskFiles | None = None) -> torch.Tensor:
    """The masks of images start..start+n: the same for every checkpoint."""
    return draw_holes(mask_kind, n, size, overlap, derive_seed(EVAL_SEED, start), area, files)


@torch.no_grad()
def evaluate(generator: nn.Module, cfg: DictConfig, images: torch.Tensor, mask: str,
             batch_size: int = 32, device: torch.device | None = None,
             neighbours_from: str | None = None, perceptual: Perceptual | None = None,
             files: MaskFiles | None = None, given: torch.Tensor | None = None) -> dict:
    """Metrics of the model and of the mean fill over uint8 NCHW `images`, and of
    nearest-neighbour inpainting from the train split of `neighbours_from` when given.
    The holes are drawn, mask kind `mask` (free-form ones of the config's area, `files`
    ones from `files`), or `given`, one per image (then `mask` only names them)."""
    device = device or torch.device("cpu")
    size = cfg.data.image_size
    window = output_window(size, cfg.mask.kind)
    scores = Scores(window, images, perceptual)
    pasted = (nearest_neighbour_fill(generator, cfg, images, neighbours_from, batch_size,
                                     device) if neighbours_from else None)
    area = (cfg.mask.min_area, cfg.mask.max_area)
    for start in range(0, len(images), batch_size):
        truth = to_model_range(images[start : start + batch_size].to(device))
        holes = (given[start : start + batch_size] if given is not None else eval_holes(
            mask, len(truth), size, cfg.mask.overlap, start, area, files)).to(device)
        check_window(holes, window, cfg.mask.kind)
        _, completed = complete(generator, truth, holes, window.offset)
        scores.add("model", completed, truth, holes)
        scores.add("mean_fill", fill_holes(truth, holes), truth, holes)
        if pasted is not None:
            scores.add("nearest_neighbour", pasted[start : start + batch_size].to(device),
                       truth, holes)
    return {"images": len(images), "mask": mask, **scores.summaries()}


@torch.no_grad()
def nearest_neighbour_fill(generator: nn.Module, cfg: DictConfig, images: torch.Tensor,
                           data_uri: str, batch_size: int = 32,
                           device: torch.device | None = None) -> torch.Tensor:
    """Center-mask NN inpainting from the train split: each of the uint8 `images`, in
    [-1, 1], with the hole of the train image whose context is closest pasted in (the
    features computed on `device`)."""
    device = device or torch.device("cpu")
    size = cfg.data.image_size
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
    return torch.where(holes, to_model_range(matches), to_model_range(images))


def evaluate_checkpoint(ckpt: Store, data_uri: str, split: str = "val",
                        mask: str | None = None, perceptual: Perceptual | None = None) -> dict:
    """Load a checkpoint and score it on a split (mask: a kind, by default the one it
    trained with, or a folder of masks named after the images), with the nearest-neighbour
    baseline where it applies (center masks, a train split), and LPIPS and FID where
    `perceptual` has their networks; on the GPU when there is one."""
    from cectl.restore import load_generator
    from cectl.runs import best_device

    generator, cfg, state = load_generator(ckpt)
    device = best_device()
    generator.to(device)
    window = output_window(cfg.data.image_size, cfg.mask.kind)
    if perceptual and perceptual.lpips:
        if window.size < LPIPS_MIN_WINDOW:
            raise BadInput(f"LPIPS needs an output window of at least {LPIPS_MIN_WINDOW} px "
                           f"and this model's is {window.size} px")
        perceptual.lpips.to(device)
    images, keys = load_eval_images(data_uri, split, cfg.data.image_size)
    mask = mask or cfg.mask.kind
    splits = read_manifest(open_store(data_uri))["splits"]
    with_neighbours = mask == "center" and split != "train" and "train" in splits
    result = evaluate(generator, cfg, images, mask, device=device, perceptual=perceptual,
                      neighbours_from=data_uri if with_neighbours else None,
                      files=trained_mask_files(cfg) if mask == "files" else None,
                      given=None if mask in KINDS else image_masks(mask, keys,
                                                                   cfg.data.image_size))
    if perceptual:
        result["unavailable"] = perceptual.unavailable
    return {**result, "checkpoint": ckpt.uri, "step": state["step"], "split": split}
