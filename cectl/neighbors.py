"""`cectl neighbors`: the nearest samples to a query by context features (Fig. 8).

The query and every sample of the split are center-cropped, their central hole filled
with the mean, and compared by the encoder's last layer (unit-length, Euclidean).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from torch import nn

from cectl.encoder import BATCH, layer_outputs, load_encoder, stack_features
from cectl.errors import BadInput
from cectl.images import Skip, decode
from cectl.masks import draw_holes, fill_holes
from cectl.pixels import eval_crop, split_batches, to_batch, to_model_range
from cectl.render import item_progress
from cectl.shard_format import open_manifest


def _context_features(stack: nn.Sequential, cfg: DictConfig, crops: list[np.ndarray],
                      layer: str) -> torch.Tensor:
    """Unit-length features of the context: the central hole filled with the mean (Fig. 8)."""
    images = to_model_range(to_batch(crops))
    holes = draw_holes("center", len(images), cfg.data.image_size, cfg.mask.overlap, 0)
    with torch.no_grad():
        features = stack_features(stack, fill_holes(images, holes))[layer]
    return F.normalize(features, dim=1)


def find_neighbors(ckpt_uri: str, data_uri: str, queries: list[Path], k: int, split: str,
                   console: Console) -> dict:
    """The k nearest samples of `split` to each query, by the encoder's last layer."""
    stack, cfg, origin = load_encoder(ckpt_uri)
    layer = list(layer_outputs(stack))[-1]
    size = cfg.data.image_size
    crops = []
    for path in queries:
        try:
            crops.append(eval_crop(np.asarray(decode(path.read_bytes()).image), size))
        except Skip as e:
            raise BadInput(f"query {path} cannot be read ({e}): give an image file") from None
    query_features = _context_features(stack, cfg, crops, layer)
    manifest = open_manifest(data_uri)
    if split not in manifest["splits"]:
        raise BadInput(f"{data_uri} has no {split!r} split (it has "
                       f"{', '.join(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    best: list[list[tuple[float, str, np.ndarray]]] = [[] for _ in queries]
    with item_progress(console) as progress:
        bar = progress.add_task(f"neighbours: {split}", total=sum(s["samples"] for s in shards))
        for batch, keys in split_batches(data_uri, split, size, BATCH):
            arrays = list(batch.permute(0, 2, 3, 1).numpy())
            distances = torch.cdist(query_features,
                                    _context_features(stack, cfg, arrays, layer))
            for q, row in enumerate(distances.tolist()):
                candidates = best[q] + list(zip(row, keys, arrays, strict=True))
                best[q] = sorted(candidates, key=lambda c: c[0])[:k]
            progress.advance(bar, len(keys))
    return {**origin, "layer": layer, "split": split, "image_size": size,
            "overlap": cfg.mask.overlap, "crops": crops, "best": best,
            "queries": [{"query": str(path),
                         "neighbors": [{"key": key, "distance": d} for d, key, _ in found]}
                        for path, found in zip(queries, best, strict=True)]}


def neighbor_grid(result: dict) -> Image.Image:
    """One row per query: the query with its hole filled by the mean, then its neighbours."""
    size = result["image_size"]
    rows = [(crop, [a for _, _, a in found]) for crop, found in
            zip(result["crops"], result["best"], strict=True)]
    columns = 1 + max(len(found) for _, found in rows)
    grid = Image.new("RGB", (columns * (size + 4), len(rows) * (size + 4)), "white")
    for r, (crop, found) in enumerate(rows):
        query = to_model_range(to_batch([crop]))
        holes = draw_holes("center", 1, size, result["overlap"], 0)
        shown = ((fill_holes(query, holes) + 1) * 127.5).round().clamp(0, 255).byte()
        tiles = [shown[0].permute(1, 2, 0).numpy(), *found]
        for c, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (c * (size + 4) + 2, r * (size + 4) + 2))
    return grid
