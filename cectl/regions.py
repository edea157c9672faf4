"""Random-region holes (sec. 3.3): smooth shapes, the `count` highest pixels of 6 x 6 noise
upsampled bicubically, `count` covering 20-30% of the image.

Vectorised, yet bit for bit the holes of torch's upsampling (tests/test_masks.py keeps
the per-sample torch loop as the reference): the upsampling runs as two small matrix
products (float32, off from torch's by < 3e-6), the `count`-th value is found among the
pixels near a quantile of a 1-in-16 subsample, and the few pixels within 2 x `REGION_EPS`
of it get their exact value from torch's own arithmetic, replayed: its weights, its tap
order, its fused multiply-adds. Where this torch build computes otherwise (checked once
per size), torch's upsampling is called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

GRID = 6  # a random-region hole is drawn from 6 x 6 noise
REGION_DRAWS = GRID * GRID + 1  # the noise, then the area
REGION_EPS = 1e-5  # bound on |float32 matrix-product field - torch's field|, with margin


def region_holes(noise: torch.Tensor, area: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 1, size, size) holes from (n, 1, GRID, GRID) `noise` and (n,) `area` draws in
    [0, 1) (the fraction 0.2 + 0.1 x area of the image)."""
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
