"""Masks and the loss weights they imply."""

from __future__ import annotations

import pytest
import torch

from cectl.masks import MEAN_FILL, draw_holes, fill_holes, loss_weights, output_window


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
