"""Procedural street facades: structured images a small model can learn to inpaint.

Rows of windows on a coloured wall give the context encoder something to infer from the
surroundings (window rhythm, wall colour, ledges), like Paris StreetView in miniature.
Every facade draws its layout, spacing, offset, colours and details from continuous
ranges, so a hole follows from its own image's context but no other image holds it: the
model must beat pasting the nearest neighbour's hole, as on real photographs.
"""

from __future__ import annotations

import colorsys
import json
import random
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter
from rich.console import Console


def _colour(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def facade(rng: random.Random, size: int) -> Image.Image:
    """A wall with a grid of windows, every parameter drawn from a continuous range."""
    hue, saturation, value = rng.random(), rng.uniform(0.1, 0.55), rng.uniform(0.45, 0.92)
    img = Image.new("RGB", (size, size), _colour(hue, saturation, value))
    draw = ImageDraw.Draw(img)
    cell_w, cell_h = size * rng.uniform(0.17, 0.34), size * rng.uniform(0.19, 0.36)
    x_phase, y_phase = rng.uniform(0, cell_w), rng.uniform(0, cell_h)
    shutters = rng.random() < 0.5
    win_w = cell_w * rng.uniform(0.3, 0.5 if shutters else 0.65)
    win_h = cell_h * rng.uniform(0.4, 0.72)
    win_y = (cell_h - win_h) * rng.uniform(0.25, 0.75)
    glass = _colour(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.12, 0.4))
    trim = _colour(hue, saturation * 0.5, min(1.0, value + rng.uniform(-0.35, 0.25)))
    shutter = _colour(rng.random(), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6))
    rim = max(1.0, size * rng.uniform(0.008, 0.025))
    ledge = max(1.0, size * rng.uniform(0.006, 0.02))
    mullion = rng.random() < 0.6
    for row in range(-1, int(size / cell_h) + 2):
        y = y_phase + row * cell_h
        draw.rectangle([0, y + cell_h - ledge, size, y + cell_h], fill=trim)
        for col in range(-1, int(size / cell_w) + 2):
            x0, y0 = x_phase + col * cell_w + (cell_w - win_w) / 2, y + win_y
            x1, y1 = x0 + win_w, y0 + win_h
            draw.rectangle([x0 - rim, y0 - rim, x1 + rim, y1 + rim], fill=trim)
            draw.rectangle([x0, y0, x1, y1], fill=glass)
            if mullion:
                draw.line([((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1)], fill=trim,
                          width=max(1, round(rim / 2)))
            if shutters:
                leaf = win_w * 0.3
                draw.rectangle([x0 - rim - leaf, y0, x0 - rim, y1], fill=shutter)
                draw.rectangle([x1 + rim, y0, x1 + rim + leaf, y1], fill=shutter)
    img = img.filter(ImageFilter.GaussianBlur(size / 160))
    noise = Image.effect_noise((size, size), 8).convert("RGB")
    return Image.blend(img, noise, 0.06)


def make_facades(out_dir: Path, count: int, size: int = 192, seed: int = 0) -> list[Path]:
    """Write `count` facade PNGs to `out_dir` (deterministic for a seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = out_dir / f"facade-{i:05d}.png"
        facade(rng, size).save(path)
        paths.append(path)
    return paths


SHAPES = ("circle", "square", "triangle", "cross")


def shape(rng: random.Random, kind: str, size: int) -> Image.Image:
    """One shape of `kind` at a random place, scale and colour on a noisy random background."""
    background = tuple(rng.randint(0, 255) for _ in range(3))
    # A colour far from the background in every case, so the silhouette always shows.
    colour = tuple((c + rng.randint(96, 160)) % 256 for c in background)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    else:
        draw.rectangle([cx - r, cy - r * 0.3, cx + r, cy + r * 0.3], fill=colour)
        draw.rectangle([cx - r * 0.3, cy - r, cx + r * 0.3, cy + r], fill=colour)
    noise = Image.effect_noise((size, size), 24).convert("RGB")
    return Image.blend(img, noise, 0.1)


def make_shapes(out_dir: Path, train_per_class: int, val_per_class: int, size: int = 64,
                seed: int = 0) -> None:
    """Labelled shapes in the ImageNet layout: `{train,val}/<wnid>/*.png`, one wnid a kind."""
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, kind in enumerate(SHAPES):
            folder = out_dir / split / f"n{index + 1:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape(rng, kind, size).save(folder / f"{kind}-{i:05d}.png")


def plot_curve(points: list[tuple[int, float]], path: Path, title: str) -> None:
    """A plain line chart as PNG (no plotting library needed)."""
    width, height, pad = 640, 360, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    steps, values = zip(*points, strict=True)
    lo, hi = min(values), max(values)
    span_x, span_y = max(steps) - min(steps) or 1, hi - lo or 1

    def xy(step: int, value: float) -> tuple[float, float]:
        return (pad + (step - min(steps)) / span_x * (width - 2 * pad),
                height - pad - (value - lo) / span_y * (height - 2 * pad))

    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    draw.line([xy(s, v) for s, v in points], fill=(30, 90, 200), width=2)
    draw.text((pad, 10), title, fill="black")
    draw.text((pad, height - pad + 8), f"step {min(steps)}", fill="black")
    draw.text((width - pad - 60, height - pad + 8), f"step {max(steps)}", fill="black")
    draw.text((4, pad - 12), f"{hi:.4f}", fill="black")
    draw.text((4, height - pad + 2), f"{lo:.4f}", fill="black")
    img.save(path)


def comparison_grid(ckpt_uri: str, data_uri: str, count: int = 8) -> Image.Image:
    """The first `count` held-out images, in rows: input with hole | model | nearest
    neighbour | truth."""
    import torch

    from cectl.evaluate import eval_holes, nearest_neighbour_fill
    from cectl.masks import fill_holes, output_window
    from cectl.model import complete
    from cectl.monitor import sample_grid
    from cectl.pixels import load_eval_images, to_model_range
    from cectl.restore import load_generator

    generator, cfg, _ = load_generator(ckpt_uri)
    images, _ = load_eval_images(data_uri, "val", cfg.data.image_size, limit=count)
    truth = to_model_range(images)
    holes = eval_holes("center", len(images), cfg.data.image_size, cfg.mask.overlap, 0)
    with torch.no_grad():
        _, completed = complete(generator, truth, holes,
                                output_window(cfg.data.image_size, "center").offset)
    neighbours = nearest_neighbour_fill(generator, cfg, images, data_uri)
    grid = sample_grid(fill_holes(truth, holes), completed, neighbours, truth)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def run_demo(out: Path, console: Console, err: Console) -> None:
    """Generate facades, shard, train jobs/demo.yaml, evaluate, inpaint, print the PNGs."""
    from cectl.config import load_config, validate_job
    from cectl.evaluate import evaluate_checkpoint
    from cectl.inpaint import inpaint
    from cectl.render import TrainProgress, score_report, status
    from cectl.runs import Run
    from cectl.schema import JobConfig, ShardConfig
    from cectl.shard import run_shard
    from cectl.storage import open_store
    from cectl.train import Session, train

    images, shards, store = out / "images", out / "shards", out / "store"
    with status(err, "generating 800 sample facades"):
        make_facades(images, 800, size=96)
    run_shard(str(images), str(shards),
              load_config(ShardConfig, flags={"shard_size": 100, "val_fraction": 0.1}), err)
    held_out = out / "held-out.png"
    facade(random.Random(10_000), 160).save(held_out)

    shutil.rmtree(store / "runs" / "demo", ignore_errors=True)
    cfg = validate_job(load_config(JobConfig, "demo", flags={"data": {"uri": str(shards)}}))
    run_store = open_store(str(store))
    started = time.perf_counter()
    with TrainProgress(err, cfg.train.steps) as progress:
        summary = train(cfg, run_store, "demo", Session(on_log=progress.update))
    seconds = time.perf_counter() - started
    run = Run(run_store, "demo")
    ckpt = run.checkpoint("latest")

    scores = evaluate_checkpoint(ckpt, str(shards))
    score_report(console, scores, f"held-out facades ({scores['images']} images, central hole)")
    comparison = out / "comparison.png"
    comparison_grid(ckpt.uri, str(shards)).save(comparison)

    inpainted = inpaint(held_out, ckpt.uri, "center", out / "inpainted.png")["out"]
    lines = run.store.read_bytes("metrics.jsonl").decode().splitlines()
    rows = [json.loads(line) for line in lines]
    curve = out / "loss-curve.png"
    plot_curve([(r["step"], r["loss_rec"]) for r in rows if "loss_rec" in r], curve,
               "reconstruction loss (training)")
    grid = sorted(run.store.list("samples/"))[-1]
    images_per_s = summary["step"] * cfg.data.batch_size / seconds
    console.print(f"trained {summary['step']} steps in {seconds:.0f} s "
                  f"({images_per_s:.0f} images/s)")
    console.print(f"sample grid (input | prediction | truth): {run.store.local_path(grid)}")
    console.print(f"held-out facades (input | model | NN | truth): {comparison}")
    console.print(f"inpainted held-out image:  {inpainted} (input: {held_out})")
    console.print(f"loss curve:                {curve}")
    console.print(f"checkpoint:                {ckpt.uri}")
