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

Training holes are drawn in the loader processes, a batch at a time, each from a seed
of its sample's position, and travel packed eight pixels a byte (`pack_holes`):
- random-block and random-region holes are drawn vectorised, yet each is, bit for bit,
  the one the earlier per-sample torch loop drew from the same seed (that loop is kept in
  tests/test_masks.py as the reference). torch's CPU generator is the 32-bit Mersenne
  Twister seeded with the seed's low 32 bits, and each element of a CPU `rand` or
  `randint` (range below 2**32) takes one output of it: NumPy's legacy `RandomState` is
  the same generator, so a random-block hole's draws come out of one call. Random-region
  holes: `cectl.regions`;
- free-form holes (brush strokes of `mask.min_area` to `mask.max_area`): `cectl.strokes`;
- holes from the user's mask images (`mask.kind=files`): `cectl.mask_files`.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from cectl.errors import BadInput
from cectl.regions import GRID, REGION_DRAWS, region_holes
from cectl.schema import MASK_KINDS, MaskConfig
from cectl.strokes import free_form_holes

if TYPE_CHECKING:
    from cectl.mask_files import MaskFiles

KINDS = MASK_KINDS
AREA = (MaskConfig.min_area, MaskConfig.max_area)  # free-form holes' default areas
# The fill of the reference code (ImageNet means 117, 104, 123 of 255), in [-1, 1].
MEAN_FILL = torch.tensor([117.0, 104.0, 123.0]).div(127.5).sub(1).view(1, 3, 1, 1)
BLOCK_DRAWS = 37  # a random-block hole takes at most: its target, then 12 x (side, y, x)
# A generator per thread, reseeded at each use (its setup once): the loader's input thread
# draws training holes while the training thread draws validation holes.
_twisters = threading.local()


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


def draw_holes(kind: str, n: int, size: int, overlap: int, seed: int,
               area: tuple[float, float] = AREA, files: MaskFiles | None = None) -> torch.Tensor:
    """(n, 1, size, size) bool holes, each sample its own, all from one `seed`; free-form
    ones cover a fraction within `area`, `files` ones are placed masks of `files`."""
    if kind == "center":
        return _center(n, size, overlap)
    if kind in ("free-form", "files"):  # drawn a seed each
        return holes_for_positions(kind, range(n), size, overlap, seed, area, files)
    if kind == "random-block":
        draws = iter(_mt_outputs(seed, BLOCK_DRAWS * n))
        return torch.from_numpy(np.stack([_block(draws, size) for _ in range(n)]))[:, None]
    if kind == "random-region":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(n, 1, GRID, GRID, generator=gen)
        return region_holes(noise, torch.rand(n, generator=gen), size)
    raise ValueError(f"mask.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def holes_for_positions(kind: str, positions: range, size: int, overlap: int, seed: int,
                        area: tuple[float, float] = AREA,
                        files: MaskFiles | None = None) -> torch.Tensor:
    """The holes of training samples, each drawn from the sample's global position: a
    sample's hole does not depend on the batch, rank or world size it lands in. Free-form
    holes cover a fraction within `area`; `files` holes are placed masks of `files`."""
    if kind == "center":
        return _center(len(positions), size, overlap)
    seeds = [derive_seed(seed, "mask", p) for p in positions]
    if kind == "free-form":
        return torch.from_numpy(free_form_holes(seeds, size, area))[:, None]
    if kind == "files":
        return torch.from_numpy(files.holes(seeds, size))[:, None]
    if kind == "random-block":
        holes = [_block(iter(_mt_outputs(s, BLOCK_DRAWS)), size) for s in seeds]
        return torch.from_numpy(np.stack(holes))[:, None]
    if kind == "random-region":
        gen, draws = torch.Generator(), torch.empty(len(seeds), REGION_DRAWS)
        for row, s in zip(draws, seeds, strict=True):
            torch.rand(REGION_DRAWS, generator=gen.manual_seed(s), out=row)
        return region_holes(draws[:, :-1].reshape(-1, 1, GRID, GRID), draws[:, -1], size)
    raise ValueError(f"mask.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def pack_holes(holes: torch.Tensor) -> torch.Tensor:
    """Holes as bits, eight pixels a byte along each row: 1/8 of the bytes to send."""
    return torch.from_numpy(np.packbits(holes.numpy(), axis=-1))


def unpack_holes(packed: torch.Tensor, size: int) -> torch.Tensor:
    """`pack_holes` undone, on the device `packed` is on (a few kernels, no host sync)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(1)
    return bits.flatten(-2)[..., :size].bool()


def loss_weights(holes: torch.Tensor, window: Window, overlap_weight: float) -> torch.Tensor:
    """Weights over the output window: 1 in the hole, `overlap_weight` everywhere else."""
    inside = window.crop(holes)
    return torch.where(inside, 1.0, overlap_weight).float()


def fill_holes(images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    return torch.where(holes, _mean_fill(images.device, images.dtype), images)


@functools.cache
def _mean_fill(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Copied to a GPU once: a copy from pageable memory at every step would wait for it.
    return MEAN_FILL.to(device, dtype)


def _center(n: int, size: int, overlap: int) -> torch.Tensor:
    holes = torch.zeros(n, 1, size, size, dtype=torch.bool)
    win = output_window(size, "center")
    a, b = win.offset + overlap, win.offset + win.size - overlap
    holes[..., a:b, a:b] = True
    return holes


def _mt_outputs(seed: int, count: int) -> list[int]:
    """The first `count` outputs of the generator `torch.Generator().manual_seed(seed)`."""
    twister = getattr(_twisters, "state", None)
    if twister is None:
        twister = _twisters.state = np.random.RandomState()
    twister.seed(seed & 0xFFFFFFFF)
    return twister.randint(0, 2**32, count, dtype=np.uint32).tolist()


def _block(draws: Iterator[int], size: int) -> np.ndarray:
    """A random-block hole: squares with sides from 1/8 to 1/4 of the image, added until
    they cover a drawn target of 15-25%; a square that would pass 1/4 is not added."""
    hole = np.zeros((size, size), dtype=bool)
    covered, most = 0, _coverage_at_least(size, 0.25, strict=True) - 1
    enough = _coverage_at_least(size, 0.15 + 0.10 * ((next(draws) & 0xFFFFFF) / 2**24))
    low, high = size // 8, size // 4 + 1
    for _ in range(12):
        if covered >= enough:
            break
        side = low + next(draws) % (high - low)  # randint(low, high)
        y, x = next(draws) % (size - side + 1), next(draws) % (size - side + 1)
        square = hole[y : y + side, x : x + side]
        grown = covered + side * side - int(np.count_nonzero(square))
        if grown <= most:
            square[...] = True
            covered = grown
    return hole


def _coverage_at_least(size: int, fraction: float, strict: bool = False) -> int:
    """The fewest pixels whose coverage reaches `fraction` (passes it, if `strict`),
    compared in float32 as the torch loop's `mean()` was."""
    area, limit = np.float32(size * size), np.float32(fraction)
    k = max(int(fraction * size * size) - 2, 0)
    while not (np.float32(k) / area > limit if strict else np.float32(k) / area >= limit):
        k += 1
    return k
