"""Free-form holes (`mask.kind=free-form`): brush strokes, the irregular masks LaMa and
DeepFill v2 train with (thick and thin strokes of a few straight segments, each of random
width, angle and length), covering a fraction of the image from [`mask.min_area`,
`mask.max_area`].

A hole is up to 8 strokes of 4 segments. A stroke starts anywhere with a random heading
and width; each segment turns by up to 90 degrees from the last, runs 10-30% of the image
side and stops at the image's edge. A segment is a capsule (the points within half the
width of it: round ends and joints). The brush widens with the hole's target area (about
12 segments reach it), so small holes are thin strokes and large ones thick.

Drawn vectorised over a batch, fast enough for a loader process (BENCHMARKS.md):
- each of the first segments of a hole gets a bit of a uint32 field, the first segment
  the highest. A segment's slices of the pixel columns are intervals, in closed form (two
  discs and a slab), added to the field as differences down the columns; a running sum
  down the rows then leaves at each pixel the bits of the segments covering it. The
  pixels of the first k segments are those where the field is at least 2 ** (32 - k);
- k starts where the capsules' summed area, discounted for their overlaps, first reaches
  the hole's target area (drawn from the range); it then steps a segment at a time until
  the exact area lies in the range. A hole that cannot get there (its segments too few,
  or one jumping over the whole range) is drawn again from its generator's next draws.

A hole depends on its seed alone: its draws are the outputs of SplitMix64 (Steele, Lea
and Flood, 2014) seeded with it, and the arithmetic is elementwise, whatever the batch.
"""

from __future__ import annotations

import functools
import itertools
import threading

import numpy as np

STROKES, SEGMENTS = 8, 4
BITS = STROKES * SEGMENTS  # one bit of a uint32 per segment
DRAWS = 1 + 4 * STROKES + 2 * BITS  # an attempt's draws: target, strokes, segments
LENGTH = (0.1, 0.3)  # a segment's length, in image sides
TURN = np.pi / 2  # most a segment turns from the last
SEGMENTS_TO_TARGET = 12  # the brush width at which about this many reach the target
OVERLAP = 0.8  # of the capsules' area, what a hole covers (strokes cross, leave the image)
EXTRA = 2  # segments drawn past the estimate, for the exact area to step into
ATTEMPTS = 100  # far more than any hole needs (1.75 on average at worst, BENCHMARKS.md)
COLUMNS = 4096  # column slices computed at a time
FIELD = 1 << 21  # uint32 elements of a pass's field (8 MB): masks per pass at a size
_SCRATCH_LOCK = threading.Lock()  # `_scratch` is the process's: one drawing at a time
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def free_form_holes(seeds: list[int], size: int, area: tuple[float, float]) -> np.ndarray:
    """(n, size, size) bool holes, hole i from `seeds[i]` alone, each covering a fraction of
    the image within `area` (inclusive)."""
    holes = np.zeros((len(seeds), size, size), dtype=bool)
    state = np.array(seeds, dtype=np.uint64)
    pending = np.arange(len(seeds))
    per_pass = max(1, FIELD // ((size + 1) * size))
    with _SCRATCH_LOCK:
        for attempt in range(ATTEMPTS):
            if not len(pending):
                return holes
            done = np.zeros(len(pending), dtype=bool)
            for at in range(0, len(pending), per_pass):
                chunk = pending[at : at + per_pass]
                drawn, done[at : at + per_pass] = _attempt(
                    _uniforms(state[chunk], DRAWS, attempt * DRAWS), size, area)
                holes[chunk] = drawn
            pending = pending[~done]
    raise ValueError(f"no free-form hole covering {area[0]:g}-{area[1]:g} of the image "
                     f"in {ATTEMPTS} attempts")


def _uniforms(seeds: np.ndarray, count: int, skip: int = 0) -> np.ndarray:
    """(n, count) floats in [0, 1): outputs skip + 1 .. skip + count of SplitMix64 from
    each of the uint64 `seeds` (53 bits each)."""
    z = seeds[:, None] + _GOLDEN * np.arange(skip + 1, skip + count + 1, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _MIX[0]
    z = (z ^ (z >> np.uint64(27))) * _MIX[1]
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _attempt(draws: np.ndarray, size: int, area: tuple[float, float]
             ) -> tuple[np.ndarray, np.ndarray]:
    """One attempt at each hole from its draws: the holes (a view of this process's
    scratch memory), and which lie in `area`."""
    segments, estimate = _strokes(draws, size, area)
    drawn = np.minimum(estimate + EXTRA, BITS)
    field = _rasterize(*segments, drawn, size)
    return _settle(field, estimate, drawn, size, area)


@functools.cache
def _scratch(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pass's field and its holes, kept for the process: 8 MB arrays made afresh for
    every batch would cost as much again in page faults."""
    elements = max(FIELD, (size + 1) * size)
    return np.empty(elements, np.uint32), np.empty(elements, bool)


def _strokes(draws: np.ndarray, size: int, area: tuple[float, float]
             ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The segments (starts, ends (n, BITS, 2), radii (n, BITS)), stroke after stroke, and
    the number of them whose nominal area first reaches each hole's target."""
    n = len(draws)
    target = area[0] + (area[1] - area[0]) * draws[:, 0]
    start, heading, width, turn, length = np.split(
        draws[:, 1:], np.cumsum([2 * STROKES, STROKES, STROKES, BITS]), axis=1)
    # The width at which SEGMENTS_TO_TARGET segments' nominal area is the target: small
    # areas take about that many, large ones (whose strokes cross more) up to twice.
    brush = target * size / (SEGMENTS_TO_TARGET * np.mean(LENGTH) * OVERLAP)
    radius = np.repeat(brush[:, None] * (0.5 + width) / 2, SEGMENTS, axis=1)
    angle = (2 * np.pi * heading[:, :, None]
             + np.cumsum(TURN * (2 * turn.reshape(n, STROKES, SEGMENTS) - 1), axis=2))
    step = (LENGTH[0] + (LENGTH[1] - LENGTH[0]) * length.reshape(n, STROKES, SEGMENTS)) * size
    points = np.empty((n, STROKES, SEGMENTS + 1, 2))
    points[:, :, 0] = start.reshape(n, STROKES, 2) * size
    for i in range(SEGMENTS):
        move = np.stack([np.cos(angle[..., i]), np.sin(angle[..., i])], axis=-1)
        points[:, :, i + 1] = np.clip(points[:, :, i] + step[..., i, None] * move, 0, size)
    p, q = points[:, :, :-1].reshape(n, BITS, 2), points[:, :, 1:].reshape(n, BITS, 2)
    nominal = 2 * radius * np.hypot(*np.moveaxis(q - p, -1, 0))
    nominal[:, ::SEGMENTS] += np.pi * radius[:, ::SEGMENTS] ** 2  # the stroke's round ends
    cover = -np.expm1(-OVERLAP * np.cumsum(nominal, axis=1) / size**2)
    estimate = np.minimum((cover < target[:, None]).sum(axis=1) + 1, BITS)
    return (p, q, radius), estimate


def _rasterize(p: np.ndarray, q: np.ndarray, radius: np.ndarray, drawn: np.ndarray,
               size: int) -> np.ndarray:
    """(size, n, size) uint32: at each pixel (y, hole, x), bit j set where the hole's
    segment j (of the first `drawn`) covers the pixel's centre."""
    f = np.float32
    n = len(p)
    hole, bit = np.nonzero(np.arange(BITS) < drawn[:, None])
    a, b, r = p[hole, bit].astype(f), q[hole, bit].astype(f), radius[hole, bit].astype(f)
    d = b - a
    length2 = (d * d).sum(axis=1)
    # Near-vertical or near-horizontal segments divide by a tiny number instead of zero:
    # their slab's bounds run off to +-1e9 or so and the intersection comes out right.
    dx = np.where(np.abs(d[:, 0]) < 1e-6, f(1e-6), d[:, 0])
    dy = np.where(np.abs(d[:, 1]) < 1e-6, f(1e-6), d[:, 1])
    # A point (a stroke stopped in a corner) has no slab: its sides are NaN.
    half = np.where(length2 > 1e-6, r * np.sqrt(length2) / np.abs(dx), f(np.nan))
    span = length2 / dy
    segments = np.stack([
        a[:, 0] - f(0.5), b[:, 0] - f(0.5), a[:, 1], b[:, 1], r * r,  # x: pixel centres
        d[:, 1] / dx, d[:, 0] / dy,  # the slope of the slab's sides, and (negated) its ends
        a[:, 1] - half, a[:, 1] + half,  # the slab's sides, at a's column
        a[:, 1] + np.minimum(span, 0), a[:, 1] + np.maximum(span, 0)])  # its ends
    bits = np.right_shift(np.uint32(1 << 31), bit.astype(np.uint32))  # first: the highest
    offsets = (hole * size).astype(np.int32)  # a hole's first value in a row of the field
    first = np.clip(np.ceil(np.minimum(a[:, 0], b[:, 0]) - r - 0.5), 0, size).astype(np.int32)
    last = np.clip(np.floor(np.maximum(a[:, 0], b[:, 0]) + r + 0.5), 0, size).astype(np.int32)
    columns = np.maximum(last - first, 0)
    ends = np.cumsum(columns)
    field = _scratch(size)[0][: (size + 1) * n * size]
    field.fill(0)
    # A few thousand columns at a time: small arrays stay in the cache and off mmap.
    cuts = np.searchsorted(ends, np.arange(COLUMNS, ends[-1] if len(ends) else 0, COLUMNS))
    for lo, hi in itertools.pairwise([0, *cuts.tolist(), len(columns)]):
        _add_columns(field, segments[:, lo:hi], bits[lo:hi], offsets[lo:hi], first[lo:hi],
                     columns[lo:hi], n * size, size)
    field = field.reshape(size + 1, n, size)
    for y in range(1, size):  # row by row: numpy's cumsum is ~8x slower along this axis
        np.add(field[y], field[y - 1], out=field[y])
    return field[:size]


def _add_columns(field: np.ndarray, segments: np.ndarray, bits: np.ndarray,
                 offsets: np.ndarray, first: np.ndarray, columns: np.ndarray, row: int,
                 size: int) -> None:
    """Add to the difference `field` (rows of `row` values) the column slices of
    `segments` (`_rasterize`'s table), each with its bit over `columns` columns from
    `first` on, in its hole (from `offsets` on in a row)."""
    f = np.float32
    counting = [a[: columns.sum()] for a in _counting(size)]
    shift = first - np.cumsum(columns) + columns  # a segment's first column less its rank
    # Each segment's values once per column it spans (np.repeat: 3x faster than a gather).
    ax, bx, ay, by, r2, slope, run, side_low, side_high, end_low, end_high, start = np.repeat(
        np.vstack([segments, shift.astype(f)]), columns, axis=1)
    column = counting[0] + start
    where = counting[1] + np.repeat(shift + offsets, columns)
    da, db = column - ax, column - bx  # from the column's centre to a's and b's
    # The column's slice of a capsule: the hull of its slices of the two end discs and of
    # the slab between them. An empty slice is NaN, which fmin and fmax pass over.
    with np.errstate(invalid="ignore"):
        disc_a = np.sqrt(r2 - da * da)
        disc_b = np.sqrt(r2 - db * db)
        along, across = da * slope, da * run
        low = np.maximum(side_low + along, end_low - across)
        high = np.minimum(side_high + along, end_high - across)
        empty = np.sqrt(high - low) * f(0)  # 0, or NaN where the slab misses the column
        low = np.fmin(np.fmin(ay - disc_a, by - disc_b), low + empty)
        high = np.fmax(np.fmax(ay + disc_a, by + disc_b), high + empty)
    # Rows from top to bottom (exclusive); a column that misses the capsule gets none.
    top = np.fmin(np.fmax(np.ceil(low - f(0.5)), 0), size)
    bottom = np.fmin(np.fmax(np.floor(high + f(0.5)), top), size)
    bits = np.repeat(bits, columns)
    np.add.at(field, top.astype(np.int32) * row + where, bits)
    np.subtract.at(field, bottom.astype(np.int32) * row + where, bits)


@functools.cache
def _counting(size: int) -> tuple[np.ndarray, np.ndarray]:
    """0, 1, 2, ... as float32 and as int32, as many as a block of columns has at most
    (made once per process)."""
    most = COLUMNS + size + 1
    return np.arange(most, dtype=np.float32), np.arange(most, dtype=np.int32)


def _settle(field: np.ndarray, estimate: np.ndarray, drawn: np.ndarray, size: int,
            area: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per hole, the first `estimate` segments, stepped one at a time until their area
    lies in `area`: (n, size, size) holes and whether each got there."""
    least, most = area[0] * size * size, area[1] * size * size
    holes = _scratch(size)[1][: field.size].reshape(field.shape)

    def prefix(k: np.ndarray, at: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """The holes of the first `k` segments of holes `at`, and which way k must go."""
        # Segment j has bit 31 - j: a pixel is in the first k where the field has a bit
        # from 32 - k up, where it is at least 2 ** (32 - k).
        least_value = np.left_shift(np.uint64(1), (32 - k).astype(np.uint64)).astype(np.uint32)
        if isinstance(at, slice):  # all of them: in the scratch memory
            covered = np.greater_equal(field, least_value[None, :, None], out=holes)
        else:
            covered = field[:, at] >= least_value[None, :, None]
        # Down the rows first (each column's count fits 16 bits): 4x faster than both at once.
        pixels = np.add.reduce(covered.view(np.uint8), axis=0, dtype=np.uint16).sum(
            axis=1, dtype=np.int64)
        return covered, np.where(pixels < least, 1, np.where(pixels > most, -1, 0))

    k = estimate.copy()
    _, step = prefix(k, slice(None))
    done = step == 0
    active = np.flatnonzero(~done)
    while len(active):
        direction = step[active]
        k[active] += direction
        inside = (k[active] >= 1) & (k[active] <= drawn[active])
        active, direction = active[inside], direction[inside]
        if not len(active):
            break
        holes[:, active], step[active] = prefix(k[active], active)
        done[active] = step[active] == 0
        active = active[step[active] == direction]  # still short (or over): go on
    return holes.transpose(1, 0, 2), done
