"""Masks and the loss weights they imply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cectl import regions, strokes
from cectl.masks import (
    MEAN_FILL,
    derive_seed,
    draw_holes,
    fill_holes,
    holes_for_positions,
    loss_weights,
    output_window,
    pack_holes,
    unpack_holes,
)


def reference_holes(kind: str, n: int, size: int, seed: int) -> torch.Tensor:
    """The per-sample torch loop random holes were first drawn with: the definition."""
    gen = torch.Generator().manual_seed(seed)
    holes = torch.zeros(n, 1, size, size, dtype=torch.bool)
    if kind == "random-block":
        for i in range(n):
            target = 0.15 + 0.10 * torch.rand((), generator=gen).item()
            for _ in range(12):
                if holes[i].float().mean() >= target:
                    break
                side = int(torch.randint(size // 8, size // 4 + 1, (), generator=gen))
                y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
                block = holes[i].clone()
                block[:, y : y + side, x : x + side] = True
                if block.float().mean() <= 0.25:
                    holes[i] = block
        return holes
    noise = torch.rand(n, 1, 6, 6, generator=gen)
    smooth = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    area = 0.2 + 0.1 * torch.rand(n, generator=gen)
    flat = smooth.flatten(1)
    count = (area * size * size).long().clamp_min(1).unsqueeze(1)
    threshold = flat.sort(dim=1, descending=True).values.gather(1, count - 1)
    return (flat >= threshold).view(n, 1, size, size)


@pytest.mark.parametrize("replay", [True, False])
@pytest.mark.parametrize("size", [32, 128, 227])
@pytest.mark.parametrize("kind", ["random-block", "random-region"])
def test_holes_drawn_in_batches_are_those_of_the_per_sample_loop(kind, size, replay,
                                                                  monkeypatch):
    if not replay:  # torch's own upsampling, as on a torch build the replay does not match
        monkeypatch.setattr(regions, "_replays_torch", lambda size: False)
    positions = range(1000, 1000 + (48 if size == 227 else 160))
    expected = torch.cat([reference_holes(kind, 1, size, derive_seed(7, "mask", p))
                          for p in positions])
    assert torch.equal(holes_for_positions(kind, positions, size, 4, 7), expected)
    assert torch.equal(draw_holes(kind, 24, size, 4, 11), reference_holes(kind, 24, size, 11))


@pytest.mark.parametrize("size", [32, 128, 227])
def test_the_fast_upsampling_stays_well_within_its_error_bound(size):
    noise = torch.rand(200, 1, 6, 6, generator=torch.Generator().manual_seed(size))
    taps = regions._bicubic_taps(size)
    fast = taps.matrix @ (noise.numpy()[:, 0] @ taps.matrix.T)
    exact = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    assert abs(fast - exact[:, 0].numpy()).max() < regions.REGION_EPS / 3


def test_packed_holes_unpack_to_the_same_holes():
    holes = draw_holes("random-region", 5, 227, 4, 3)
    packed = pack_holes(holes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 1, 227, 29)
    assert torch.equal(unpack_holes(packed, 227), holes)


def test_center_hole_leaves_the_overlap_band_visible():
    holes = draw_holes("center", 2, 128, overlap=4, seed=0)
    assert holes.shape == (2, 1, 128, 128)
    assert holes[0, 0, 36:92, 36:92].all() and holes.sum() == 2 * 56 * 56
    weights = loss_weights(holes, output_window(128, "center"), overlap_weight=10)
    assert weights.shape == (2, 1, 64, 64)
    assert (weights[0, 0, 4:60, 4:60] == 1).all()
    band = weights[0, 0].clone()
    band[4:60, 4:60] = 0
    assert (band[band > 0] == 10).all() and (band > 0).sum() == 64 * 64 - 56 * 56
    assert weights.sum() == 2 * (56 * 56 + 10 * (64 * 64 - 56 * 56))


def test_random_blocks_cover_up_to_a_quarter_and_differ_per_sample():
    holes = draw_holes("random-block", 16, 128, overlap=4, seed=3)
    area = holes.float().mean(dim=(1, 2, 3))
    assert (area > 0.05).all() and (area <= 0.25).all()
    assert not torch.equal(holes[0], holes[1])


def test_random_regions_cover_20_to_30_percent():
    holes = draw_holes("random-region", 16, 128, overlap=4, seed=5)
    area = holes.float().mean(dim=(1, 2, 3))
    assert (area >= 0.19).all() and (area <= 0.31).all()


@pytest.mark.parametrize("kind", ["center", "random-block", "random-region", "free-form"])
def test_masks_are_reproducible_from_the_seed(kind):
    assert torch.equal(draw_holes(kind, 4, 64, 2, seed=11), draw_holes(kind, 4, 64, 2, seed=11))
    if kind != "center":
        assert not torch.equal(draw_holes(kind, 4, 64, 2, seed=11),
                               draw_holes(kind, 4, 64, 2, seed=12))


@pytest.mark.parametrize("kind", ["random-block", "random-region", "free-form"])
def test_holes_drawn_in_two_threads_at_once_are_those_drawn_alone(kind):
    """The loader's input thread draws training holes while the training thread draws
    validation holes (a loader without processes)."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: a shared generator shows
    try:
        alone = [holes_for_positions(kind, range(16 * b, 16 * b + 16), 32, 2, b)
                 for b in range(40)]
        together = [None] * 40

        def draw(batches: range) -> None:
            for b in batches:
                together[b] = holes_for_positions(kind, range(16 * b, 16 * b + 16), 32, 2, b)

        threads = [threading.Thread(target=draw, args=(range(i, 40, 2),)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_dropped_pixels_take_the_dataset_mean():
    images = torch.zeros(1, 3, 32, 32)
    holes = draw_holes("center", 1, 32, 2, 0)
    filled = fill_holes(images, holes)
    assert torch.equal(filled[0, :, 16, 16], MEAN_FILL.flatten())
    assert torch.equal(filled[0, :, 0, 0], torch.zeros(3))


def test_a_free_form_hole_depends_on_its_position_alone():
    whole = holes_for_positions("free-form", range(100, 164), 64, 2, 7)
    # As two ranks of a batch, or as batches of another size, would draw them.
    parts = [holes_for_positions("free-form", range(a, b), 64, 2, 7)
             for a, b in ((100, 101), (101, 130), (130, 164))]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(holes_for_positions("free-form", range(100, 164), 64, 2, 8), whole)
    assert len({hole.numpy().tobytes() for hole in whole}) == len(whole)


@pytest.mark.parametrize("size", [16, 32, 128])
@pytest.mark.parametrize("area", [(0.1, 0.4), (0.3, 0.35), (0.01, 0.06), (0.85, 0.9)])
def test_free_form_holes_cover_the_configured_area(size, area):
    holes = holes_for_positions("free-form", range(200), size, 2, 3, area=area)
    covered = holes.float().mean(dim=(1, 2, 3))
    assert (covered >= area[0]).all() and (covered <= area[1]).all()
    if area[1] - area[0] > 0.1:  # spread over the range, not piled at one end
        assert covered.min() < area[0] + 0.1 * (area[1] - area[0])
        assert covered.max() > area[1] - 0.1 * (area[1] - area[0])


def test_free_form_strokes_are_exactly_the_pixels_within_half_the_brush_of_a_segment():
    rng = np.random.default_rng(0)
    size, n = 48, 6
    a = rng.uniform(0, size, (n, strokes.BITS, 2))
    b = np.clip(a + rng.normal(0, 12, a.shape), 0, size)
    b[:, ::7] = a[:, ::7]  # points
    b[:, 3::9, 0] = a[:, 3::9, 0]  # vertical segments
    b[:, 5::9, 1] = a[:, 5::9, 1]  # horizontal ones
    radius = rng.uniform(0.3, 9, (n, strokes.BITS))
    field = strokes._rasterize(a, b, radius, np.full(n, strokes.BITS), size)
    centre = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5), -1)
    for j in range(strokes.BITS):
        d = b[:, j] - a[:, j]  # (n, 2)
        rel = centre[None] - a[:, j, None, None]  # (n, y, x, 2)
        t = np.clip((rel * d[:, None, None]).sum(-1) / np.maximum((d * d).sum(-1), 1e-12)[
            :, None, None], 0, 1)
        distance = np.linalg.norm(rel - t[..., None] * d[:, None, None], axis=-1)
        inside = distance <= radius[:, j, None, None]
        drawn = (field.transpose(1, 0, 2) >> np.uint32(31 - j)) & 1 == 1
        # float32 arithmetic may only decide pixel centres a hair from the edge otherwise
        edge = np.abs(distance - radius[:, j, None, None]) < 1e-3
        assert (inside == drawn)[~edge].all(), j
