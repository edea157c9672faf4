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

Training holes are drawn in the loader processes, a batch at a time, and travel packed
eight pixels a byte (`pack_holes`). The drawing is vectorised, yet each hole is, bit for
bit, the one the earlier per-sample torch loop drew from the same seed (that loop is kept
in tests/test_masks.py as the reference):
- torch's CPU generator is the 32-bit Mersenne Twister seeded with the seed's low 32 bits,
  and each element of a CPU `rand` or `randint` (range below 2**32) takes one output of
  it: NumPy's legacy `RandomState` is the same generator, so a random-block hole's draws
  come out of one call;
- a random-region hole is the top `count` pixels of bicubically upsampled noise. The
  upsampling runs as two small matrix products (float32, off from torch's by < 3e-6), the
  `count`-th value is found among the pixels near a quantile of a 1-in-16 subsample, and
  the few pixels within 2 x `REGION_EPS` of it get their exact value from torch's own
  arithmetic, replayed: its weights, its tap order, its fused multiply-adds. Where this
  torch build computes otherwise (checked once per size), torch's upsampling is called.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cectl.errors import BadInput
from cectl.schema import MASK_KINDS

KINDS = MASK_KINDS
# The fill of the reference code (ImageNet means 117, 104, 123 of 255), in [-1, 1].
MEAN_FILL = torch.tensor([117.0, 104.0, 123.0]).div(127.5).sub(1).view(1, 3, 1, 1)
BLOCK_DRAWS = 37  # a random-block hole takes at most: its target, then 12 x (side, y, x)
GRID = 6  # a random-region hole is drawn from 6 x 6 noise
REGION_DRAWS = GRID * GRID + 1  # the noise, then the area
REGION_EPS = 1e-5  # bound on |float32 matrix-product field - torch's field|, with margin
_TWISTER = np.random.RandomState()  # reseeded at each use: one per process saves its setup


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
    """(n, 1, size, size) bool holes, each sample its own, all from one `seed`."""
    if kind == "center":
        return _center(n, size, overlap)
    if kind == "random-block":
        draws = iter(_mt_outputs(seed, BLOCK_DRAWS * n))
        return torch.from_numpy(np.stack([_block(draws, size) for _ in range(n)]))[:, None]
    if kind == "random-region":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(n, 1, GRID, GRID, generator=gen)
        return _regions(noise, torch.rand(n, generator=gen), size)
    raise ValueError(f"mask.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def holes_for_positions(kind: str, positions: range, size: int, overlap: int,
                        seed: int) -> torch.Tensor:
    """The holes of training samples, each drawn from the sample's global position: a
    sample's hole does not depend on the batch, rank or world size it lands in."""
    if kind == "center":
        return _center(len(positions), size, overlap)
    seeds = [derive_seed(seed, "mask", p) for p in positions]
    if kind == "random-block":
        holes = [_block(iter(_mt_outputs(s, BLOCK_DRAWS)), size) for s in seeds]
        return torch.from_numpy(np.stack(holes))[:, None]
    if kind == "random-region":
        gen, draws = torch.Generator(), torch.empty(len(seeds), REGION_DRAWS)
        for row, s in zip(draws, seeds, strict=True):
            torch.rand(REGION_DRAWS, generator=gen.manual_seed(s), out=row)
        return _regions(draws[:, :-1].reshape(-1, 1, GRID, GRID), draws[:, -1], size)
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
    _TWISTER.seed(seed & 0xFFFFFFFF)
    return _TWISTER.randint(0, 2**32, count, dtype=np.uint32).tolist()


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


def _regions(noise: torch.Tensor, area: torch.Tensor, size: int) -> torch.Tensor:
    """Random-region holes: smooth shapes, the `count` highest pixels of the noise
    upsampled bicubically, `count` covering 20-30% of the image."""
    n, grid = len(noise), noise.numpy()[:, 0]
    count = ((0.2 + 0.1 * area) * size * size).long().clamp_min(1).numpy()
    if _replays_torch(size):
        taps = _bicubic_taps(size)
        field, eps = taps.matrix @ (grid @ taps.matrix.T), REGION_EPS
    else:
        field, eps = _torch_field(noise, size), 0.0
    # A bracket around each threshold from a 1-in-16 subsample's quantile.
    sub = np.sort(field[:, ::4, ::4].reshape(n, -1), axis=1)
    m, wide = sub.shape[1], max(4, sub.shape[1] // 64)
    at = m - 1 - count * m // (size * size)  # the estimate's index, ascending
    high = np.where(at + wide < m, sub[np.arange(n), np.minimum(at + wide, m - 1)], np.inf)
    low = np.where(at >= wide, sub[np.arange(n), np.maximum(at - wide, 0)], -np.inf)

    def exact(images: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        return _replayed_field(grid, size, images, pixels)

    holes = _highest(field.reshape(n, -1), count, low, high, eps, exact)
    return torch.from_numpy(holes.reshape(n, 1, size, size))


def _highest(field: np.ndarray, count: np.ndarray, low: np.ndarray, high: np.ndarray,
             eps: float, exact: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Per row of `field` (values within `eps` of the exact ones that `exact(rows,
    columns)` gives), the pixels whose exact value is at least the `count`-th highest,
    given a bracket (`low`, `high`) thought to hold each row's threshold: the pixels above
    it are in, those inside it are the candidates, a row whose bracket missed is redone
    with every pixel as a candidate."""
    n, pixels = field.shape
    holes = field >= high[:, None]
    candidates = np.flatnonzero((field >= low[:, None]) ^ holes)
    rows, values = candidates // pixels, field.reshape(-1)[candidates]
    starts = np.searchsorted(rows, np.arange(n + 1))
    ranks = count - holes.view(np.uint8).sum(axis=1, dtype=np.int32)
    threshold = np.full(n, np.nan)
    for i in np.flatnonzero((ranks > 0) & (ranks <= np.diff(starts))):
        threshold[i] = _largest(values[starts[i] : starts[i + 1]], ranks[i])
    missed = ~((low + 2 * eps <= threshold) & (threshold <= high - 2 * eps))
    if missed.any():
        redo = np.flatnonzero(missed)
        holes[redo] = _highest(field[redo], count[redo], np.full(len(redo), -np.inf),
                               np.full(len(redo), np.inf), eps,
                               lambda r, c: exact(redo[r], c))
    kept, at = ~missed[rows], threshold[rows]
    sure = kept & (values >= at + 2 * eps)
    holes.reshape(-1)[candidates[sure]] = True
    if eps:  # a band around each threshold: there the exact values decide
        band = kept & ~sure & (values > at - 2 * eps)
        left = ranks - np.bincount(rows[sure], minlength=n)  # the threshold's rank in it
        rows, cells = rows[band], candidates[band]
        truth = exact(rows, cells % pixels)
        if len(truth):
            ordered = np.lexsort((-truth, rows))  # by row, each row's highest first
            first = np.searchsorted(rows[ordered], np.arange(n))
            cut = truth[ordered][np.clip(first + left - 1, 0, len(truth) - 1)]
            holes.reshape(-1)[cells[truth >= cut[rows]]] = True
    return holes


def _largest(values: np.ndarray, rank: int) -> float:
    """The `rank`-th largest of `values` (1: the largest)."""
    return np.partition(values, len(values) - rank)[len(values) - rank]


def _torch_field(noise: torch.Tensor, size: int) -> np.ndarray:
    return F.interpolate(noise, size=(size, size), mode="bicubic",
                         align_corners=False)[:, 0].numpy()


class _Taps(NamedTuple):
    index: np.ndarray  # (size, 4) source pixel of each tap, clamped to the grid
    weight: np.ndarray  # (size, 4) float32, as torch computes them
    matrix: np.ndarray  # (size, GRID) float32: the taps summed per source pixel


@functools.cache
def _bicubic_taps(size: int) -> _Taps:
    """torch's bicubic taps from a 6-pixel grid to `size` (align_corners=False, A=-0.75),
    computed in float32 in torch's order."""
    f, a = np.float32, np.float32(-0.75)
    scale = f(GRID) / f(size)
    index, weight = np.zeros((size, 4), np.int64), np.zeros((size, 4), np.float32)
    near = lambda x: ((a + f(2)) * x - (a + f(3))) * x * x + f(1)  # noqa: E731
    far = lambda x: ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a  # noqa: E731
    for o in range(size):
        source = scale * (f(o) + f(0.5)) - f(0.5)
        first = min(int(np.floor(source)), GRID - 1)
        t = min(max(source - f(first), f(0)), f(1))
        weight[o] = [far(t + f(1)), near(t), near(f(1) - t), far(f(1) - t + f(1))]
        index[o] = [max(min(first - 1 + k, GRID - 1), 0) for k in range(4)]
    matrix = np.zeros((size, GRID), np.float32)
    for k in range(4):
        np.add.at(matrix, (np.arange(size), index[:, k]), weight[:, k])
    return _Taps(index, weight, matrix)


def _replayed_field(noise: np.ndarray, size: int, images: np.ndarray,
                    pixels: np.ndarray) -> np.ndarray:
    """torch's upsampled value at `pixels` (flat) of `images`, by its own arithmetic:
    per output, the products of taps 1, 0, 2, 3 accumulated in that order, the first
    rounded, the others fused (one rounding each), rows after columns."""
    taps = _bicubic_taps(size)
    ys, xs = np.divmod(pixels, size)
    grid = noise[images[:, None, None], taps.index[ys][:, :, None], taps.index[xs][:, None, :]]
    columns = _tap_sum(grid, taps.weight[xs][:, None, :])
    return _tap_sum(columns, taps.weight[ys])


def _tap_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = values[..., 1] * weights[..., 1]
    for k in (0, 2, 3):
        total = _fused_multiply_add(values[..., k], weights[..., k], total)
    return total


def _fused_multiply_add(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once: exact product and sum in float64 with the error of
    the sum (TwoSum), which settles the rare float64 result on a float32 midpoint."""
    product = a.astype(np.float64) * b
    c = c.astype(np.float64)
    total = product + c
    back = total - product
    error = (product - (total - back)) + (c - back)
    nearest = total.astype(np.float32)
    other = np.where(total > nearest, np.nextafter(nearest, np.float32(np.inf)),
                     np.nextafter(nearest, np.float32(-np.inf)))
    tie = (total != nearest) & (2 * total == nearest.astype(np.float64) + other)
    toward = tie & (error != 0) & ((error > 0) == (other > nearest))
    return np.where(toward, other, nearest)


@functools.cache
def _replays_torch(size: int) -> bool:
    """Whether `_replayed_field` gives this torch build's upsampling, bit for bit, at
    this size (on the x86 builds cectl is tested with it does for powers of two)."""
    noise = torch.rand(4, 1, GRID, GRID, generator=torch.Generator().manual_seed(0))
    every = np.arange(size * size)
    replayed = np.concatenate([_replayed_field(noise.numpy()[:, 0], size, np.full_like(every, i),
                                               every) for i in range(len(noise))])
    return np.array_equal(replayed, _torch_field(noise, size).reshape(-1))
