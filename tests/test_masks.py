"""Masks and the loss weights they imply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cectl import masks
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
        monkeypatch.setattr(masks, "_replays_torch", lambda size: False)
    positions = range(1000, 1000 + (48 if size == 227 else 160))
    expected = torch.cat([reference_holes(kind, 1, size, derive_seed(7, "mask", p))
                          for p in positions])
    assert torch.equal(holes_for_positions(kind, positions, size, 4, 7), expected)
    assert torch.equal(draw_holes(kind, 24, size, 4, 11), reference_holes(kind, 24, size, 11))


@pytest.mark.parametrize("size", [32, 128, 227])
def test_the_fast_upsampling_stays_well_within_its_error_bound(size):
    noise = torch.rand(200, 1, 6, 6, generator=torch.Generator().manual_seed(size))
    taps = masks._bicubic_taps(size)
    fast = taps.matrix @ (noise.numpy()[:, 0] @ taps.matrix.T)
    exact = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    assert abs(fast - exact[:, 0].numpy()).max() < masks.REGION_EPS / 3


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


@pytest.mark.parametrize("kind", ["center", "random-block", "random-region"])
def test_masks_are_reproducible_from_the_seed(kind):
    assert torch.equal(draw_holes(kind, 4, 64, 2, seed=11), draw_holes(kind, 4, 64, 2, seed=11))
    if kind != "center":
        assert not torch.equal(draw_holes(kind, 4, 64, 2, seed=11),
                               draw_holes(kind, 4, 64, 2, seed=12))


def test_dropped_pixels_take_the_dataset_mean():
    images = torch.zeros(1, 3, 32, 32)
    holes = draw_holes("center", 1, 32, 2, 0)
    filled = fill_holes(images, holes)
    assert torch.equal(filled[0, :, 16, 16], MEAN_FILL.flatten())
    assert torch.equal(filled[0, :, 0, 0], torch.zeros(3))
