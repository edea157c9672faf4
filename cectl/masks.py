"""Masks (sec. 3.3): which pixels are dropped, and how the loss weighs the prediction.

A hole is a boolean map (True = dropped). Dropped pixels are filled with a fixed colour,
ImageNet's mean as in the reference code, whatever the data set.
The generator predicts an output window: the central half of the image for `center`
masks, the whole image otherwise. As in the authors' train.lua / train_random.lua, the
reconstruction loss covers the whole window: hole pixels weigh 1 and every other pixel of
the window weighs `mask.overlap_weight` (10x). For `center` masks those other pixels are
the band of `mask.overlap` px the hole leaves visible inside the window; for random masks
they are all of the context (the authors' `useOverlapPred`; `mask.overlap_weight=1` is
their plain L2 over the whole image).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cectl.errors import BadInput
from cectl.schema import MASK_KINDS

KINDS = MASK_KINDS
# The fill of the reference code (ImageNet means 117, 104, 123 of 255), in [-1, 1].
MEAN_FILL = torch.tensor([117.0, 104.0, 123.0]).div(127.5).sub(1).view(1, 3, 1, 1)


class Window(NamedTuple):
    offset: int
    size: int

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.offset : self.offset + self.size, self.offset : self.offset + self.size]


def output_window(image_size: int, kind: str) -> Window:
    if kind == "center":
        return Window((image_size - image_size // 2) // 2, image_size // 2)
    return Window(0, image_size)


def check_window(holes: torch.Tensor, window: Window, trained_kind: str) -> None:
    """Refuse holes the model cannot fill: it predicts only its output window."""
    inside = torch.zeros_like(holes)
    inside[..., window.offset : window.offset + window.size,
           window.offset : window.offset + window.size] = True
    if (holes & ~inside).any():
        raise BadInput(f"this model was trained with mask.kind={trained_kind} and predicts "
                       f"only the central {window.size}x{window.size} window: use a mask "
                       "inside it (--mask center)")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, step, rank, ...), stable across runs and hosts."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_holes(kind: str, n: int, size: int, overlap: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) bool holes, each sample its own, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    holes = torch.zeros(n, 1, size, size, dtype=torch.bool)
    if kind == "center":
        win = output_window(size, kind)
        a, b = win.offset + overlap, win.offset + win.size - overlap
        holes[..., a:b, a:b] = True
    elif kind == "random-block":
        for i in range(n):
            target = 0.15 + 0.10 * torch.rand((), generator=gen).item()  # up to 1/4
            for _ in range(12):
                if holes[i].float().mean() >= target:
                    break
                side = int(torch.randint(size // 8, size // 4 + 1, (), generator=gen))
                y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
                block = holes[i].clone()
                block[:, y : y + side, x : x + side] = True
                if block.float().mean() <= 0.25:
                    holes[i] = block
    elif kind == "random-region":
        # Smooth random shapes: low-resolution noise, upsampled, thresholded so that
        # each hole covers 20-30% of the image.
        noise = torch.rand(n, 1, 6, 6, generator=gen)
        smooth = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
        area = 0.2 + 0.1 * torch.rand(n, generator=gen)
        flat = smooth.flatten(1)
        count = (area * size * size).long().clamp_min(1).unsqueeze(1)
        threshold = flat.sort(dim=1, descending=True).values.gather(1, count - 1)
        holes = (flat >= threshold).view(n, 1, size, size)
    else:
        raise ValueError(f"mask.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return holes


def holes_for_positions(kind: str, positions: range, size: int, overlap: int,
                        seed: int) -> torch.Tensor:
    """The holes of training samples, each drawn from the sample's global position: a
    sample's hole does not depend on the batch, rank or world size it lands in."""
    if kind == "center":
        return draw_holes(kind, len(positions), size, overlap, seed)
    return torch.cat([draw_holes(kind, 1, size, overlap, derive_seed(seed, "mask", p))
                      for p in positions])


def loss_weights(holes: torch.Tensor, window: Window, overlap_weight: float) -> torch.Tensor:
    """Weights over the output window: 1 in the hole, `overlap_weight` everywhere else."""
    inside = window.crop(holes)
    return torch.where(inside, 1.0, overlap_weight).float()


def fill_holes(images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    return torch.where(holes, MEAN_FILL.to(images), images)
