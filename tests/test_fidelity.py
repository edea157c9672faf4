"""Fidelity to the paper and the authors' Lua code: loss scale, random-mask loss, flips,
learning rates, the inpaint paste rule and the Table 1 conventions."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from helpers import tiny_job
from PIL import Image

from cectl.checkpoint import load_generator
from cectl.data import TrainLoader
from cectl.evaluate import evaluate_checkpoint, nearest_neighbour
from cectl.inpaint import inpaint
from cectl.losses import reconstruction_loss
from cectl.masks import derive_seed, draw_holes, fill_holes, loss_weights, output_window
from cectl.model import build_models
from cectl.pixels import load_eval_images, to_batch, to_model_range, train_sample
from cectl.shard_format import open_manifest
from cectl.storage import open_store
from cectl.train import describe_batch, train


def test_reconstruction_loss_is_the_authors_mean_of_weighted_squares():
    # train.lua, center masks: wtl2Matrix is 10 over the 64x64 window and 1 inside the
    # overlap band; the loss is mean((fake - real)^2 * wtl2Matrix) over N x 3 x 64 x 64.
    size, overlap = 16, 2
    holes = draw_holes("center", 2, size, overlap, 0)
    window = output_window(size, "center")
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[0, 0, 4, 4] = 0.5  # in the hole: weight 1
    pred[1, 2, 0, 0] = 0.5  # in the overlap band: weight 10
    loss = reconstruction_loss(pred, target, loss_weights(holes, window, 10.0))
    assert loss.item() == pytest.approx((0.25 * 1 + 0.25 * 10) / (2 * 3 * 8 * 8))

    fake, real = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    wtl2 = torch.full_like(fake, 10.0)
    wtl2[..., overlap : 8 - overlap, overlap : 8 - overlap] = 1.0
    authors = ((fake - real).square() * wtl2).mean()
    ours = reconstruction_loss(fake, real, loss_weights(holes, window, 10.0))
    assert ours.item() == pytest.approx(authors.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["random-block", "random-region"])
def test_random_mask_weights_cover_the_whole_output(kind):
    # train_random.lua with useOverlapPred: L2 on the whole image, 1 in the hole, 10 on
    # the context.
    holes = draw_holes(kind, 4, 64, 4, seed=7)
    weights = loss_weights(holes, output_window(64, kind), 10.0)
    assert weights.shape == (4, 1, 64, 64)
    assert (weights[holes] == 1).all() and (weights[~holes] == 10).all()
    plain = loss_weights(holes, output_window(64, kind), 1.0)
    assert (plain == 1).all()  # mask.overlap_weight=1: the authors' plain whole-image L2


def test_random_mask_networks_add_a_64_channel_layer_at_high_resolution():
    cfg = tiny_job("unused", "model.width=64", "model.bottleneck=100", "data.image_size=128",
                   "mask.kind=random-region")
    generator, discriminator = build_models(cfg)
    # train_random.lua: ... 128 -> 64 channels at 64x64 -> 3 at 128x128, and the
    # discriminator's second layer keeps 64 channels.
    last_ups = [m for m in generator.decoder if isinstance(m, torch.nn.ConvTranspose2d)][-2:]
    assert [(m.in_channels, m.out_channels) for m in last_ups] == [(64, 64), (64, 3)]
    convs = [m for m in discriminator.net if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 64, 128, 256, 512, 1]


def test_flips_come_at_half_the_crops_seeded_per_sample():
    half = np.zeros((32, 32, 3), dtype=np.uint8)
    half[:, :16] = 255  # left half white: a flip moves it right
    buf = io.BytesIO()
    Image.fromarray(half).save(buf, "PNG")
    sample = {"png": buf.getvalue()}
    flipped = [train_sample(sample, 32, 32, random.Random(derive_seed(0, "crop", i)))[0, 0, 0]
               == 0 for i in range(400)]
    assert 0.42 < sum(flipped) / len(flipped) < 0.58
    again = [train_sample(sample, 32, 32, random.Random(derive_seed(0, "crop", i)))[0, 0, 0]
             == 0 for i in range(400)]
    assert flipped == again


def test_loader_with_flips_resumes_exactly(facade_shards):
    cfg = tiny_job(facade_shards)
    manifest = open_manifest(facade_shards)
    straight = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    batches = [next(straight)[0] for _ in range(5)]
    resumed = TrainLoader(facade_shards, manifest, cfg, 0, 1)
    resumed.load_state_dict({"samples": 3 * cfg.data.batch_size})
    assert torch.equal(next(resumed)[0], batches[3]) and torch.equal(next(resumed)[0], batches[4])


@pytest.mark.parametrize(("mode", "step_size"), [("rec", 2e-4), ("joint", 2e-3)])
def test_generator_lr_is_10x_only_against_a_discriminator(mode, step_size, facade_shards,
                                                          tmp_path):
    cfg = tiny_job(facade_shards, "train.steps=1", f"loss.mode={mode}")
    torch.manual_seed(cfg.train.seed)
    before, _ = build_models(cfg)
    train(cfg, open_store(str(tmp_path)), "lr")
    after, _, _ = load_generator(str(tmp_path / "runs/lr/checkpoints/step-000001"))
    # Adam's first step moves each weight by at most lr, and the largest moves by ~lr.
    moved = max((a - b).abs().max().item()
                for a, b in zip(after.parameters(), before.parameters(), strict=True))
    assert step_size * 0.9 < moved < step_size * 1.01


def test_start_up_line_names_the_effective_batch_and_the_remedy(facade_shards):
    cfg = tiny_job(facade_shards, "data.batch_size=64")
    assert describe_batch(cfg, 1) == "effective batch 1 x 64 = 64"
    line = describe_batch(cfg, 4)
    assert "4 x 64 = 256" in line and "data.batch_policy=global" in line
    shared = tiny_job(facade_shards, "data.batch_size=64", "data.batch_policy=global")
    assert describe_batch(shared, 4) == "effective batch 4 x 16 = 64"


@pytest.fixture(scope="module")
def checkpoint_128(facade_shards, tmp_path_factory) -> str:
    """One step of a narrow 128 px center model: the paper's geometry, cheaply."""
    store = tmp_path_factory.mktemp("store128")
    cfg = tiny_job(facade_shards, "data.image_size=128", "data.load_size=128",
                   "mask.overlap=4", "data.batch_size=2", "train.steps=1")
    train(cfg, open_store(str(store)), "c128")
    return str(store / "runs" / "c128" / "checkpoints" / "step-000001")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_inpaint_at_the_network_size_is_the_hard_paste_of_test_lua(checkpoint_128, tmp_path):
    image = random_image(128, 128)
    image.save(tmp_path / "in.png")
    inpaint(tmp_path / "in.png", checkpoint_128, "center", tmp_path / "out.png")
    generator, cfg, _ = load_generator(checkpoint_128)
    truth = to_model_range(to_batch([np.asarray(image)]))
    holes = draw_holes("center", 1, 128, cfg.mask.overlap, 0)
    with torch.no_grad():
        pred = generator(fill_holes(truth, holes))
    window = output_window(128, "center")
    expected = np.asarray(image).copy()
    pasted = pred[0].add(1).mul(127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    a, b = window.offset + cfg.mask.overlap, window.offset + window.size - cfg.mask.overlap
    inner = slice(cfg.mask.overlap, window.size - cfg.mask.overlap)
    expected[a:b, a:b] = pasted[inner, inner]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)


def test_inpaint_keeps_the_aspect_ratio_of_a_wide_image(checkpoint_128, tmp_path):
    wide = random_image(300, 170, seed=1)
    wide.save(tmp_path / "wide.png")
    wide.crop((65, 0, 235, 170)).save(tmp_path / "square.png")  # its central square
    result = inpaint(tmp_path / "wide.png", checkpoint_128, "center", tmp_path / "wide-out.png")
    assert result["context"] == {"x": 65, "y": 0, "side": 170}
    inpaint(tmp_path / "square.png", checkpoint_128, "center", tmp_path / "square-out.png")
    out = np.asarray(Image.open(tmp_path / "wide-out.png"))
    # The hole of the wide image is filled exactly as that of its unsquashed square.
    assert np.array_equal(out[:, 65:235], np.asarray(Image.open(tmp_path / "square-out.png")))
    assert np.array_equal(out[:, :65], np.asarray(wide)[:, :65])
    assert np.array_equal(out[:, 235:], np.asarray(wide)[:, 235:])


def test_inpaint_puts_an_off_centre_hole_in_the_middle_of_a_square(checkpoint_128, tmp_path):
    random_image(300, 170, seed=2).save(tmp_path / "wide.png")
    hole = np.zeros((170, 300), dtype=np.uint8)
    hole[10:50, 240:290] = 255  # near the top right corner
    Image.fromarray(hole).save(tmp_path / "mask.png")
    result = inpaint(tmp_path / "wide.png", checkpoint_128, str(tmp_path / "mask.png"),
                     tmp_path / "out.png")
    x, y, side = result["context"].values()
    scale = side / 128
    # The hole lies in the model's central 64 px window of a square context.
    assert x + 32 * scale <= 240 and x + 96 * scale >= 290
    assert y + 32 * scale <= 10 and y + 96 * scale >= 50
    changed = np.any(np.asarray(Image.open(tmp_path / "out.png")) !=
                     np.asarray(Image.open(tmp_path / "wide.png")), axis=2)
    assert not (changed & (hole == 0)).any()


def test_eval_reports_the_table1_variants_and_the_nn_baseline(tiny_checkpoint, facade_shards):
    result = evaluate_checkpoint(open_store(tiny_checkpoint), facade_shards)
    fill = result["mean_fill"]
    assert fill["psnr_pooled_db"] == pytest.approx(10 * math.log10(100 / fill["l2_pct"]))
    # The window adds the overlap band, where the fill keeps the true context.
    assert fill["psnr_window_db"] > fill["psnr_db"]
    assert set(result["nearest_neighbour"]) == set(fill)


def test_nearest_neighbour_of_a_train_image_is_itself(tiny_checkpoint, facade_shards):
    generator, cfg, _ = load_generator(tiny_checkpoint)
    images, _ = load_eval_images(facade_shards, "train", cfg.data.image_size, limit=6)
    scores = nearest_neighbour(generator, cfg, images, facade_shards)
    assert scores["l2_pct"] == 0.0 and scores["l1_pct"] == 0.0
