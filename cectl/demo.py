"""Procedural street facades: structured images a small model can learn to inpaint.

Rows of windows on a coloured wall give the context encoder something to infer from the
surroundings (window rhythm, wall colour, floor lines), like Paris StreetView in miniature.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

WALLS = [(214, 196, 160), (200, 190, 175), (186, 160, 130), (225, 215, 195), (170, 165, 160)]


def facade(rng: random.Random, size: int) -> Image.Image:
    wall = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in rng.choice(WALLS))
    img = Image.new("RGB", (size, size), wall)
    draw = ImageDraw.Draw(img)
    rows, cols = rng.randint(3, 5), rng.randint(3, 5)
    cell_w, cell_h = size / cols, size / rows
    glass = (rng.randint(30, 70), rng.randint(40, 80), rng.randint(60, 100))
    frame = tuple(min(255, c + 40) for c in wall)
    win_w, win_h = cell_w * rng.uniform(0.35, 0.55), cell_h * rng.uniform(0.45, 0.65)
    shutters = rng.random() < 0.5
    shutter = (rng.randint(40, 90), rng.randint(80, 130), rng.randint(50, 90))
    for r in range(rows):
        y = r * cell_h
        draw.line([(0, y), (size, y)], fill=tuple(c - 25 for c in wall), width=2)
        for c in range(cols):
            x0 = c * cell_w + (cell_w - win_w) / 2
            y0 = y + (cell_h - win_h) / 2
            box = [x0, y0, x0 + win_w, y0 + win_h]
            draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=frame)
            draw.rectangle(box, fill=glass)
            draw.line([(x0 + win_w / 2, y0), (x0 + win_w / 2, y0 + win_h)], fill=frame, width=1)
            if shutters:
                draw.rectangle([box[0] - win_w * 0.3, box[1], box[0] - 3, box[3]], fill=shutter)
                draw.rectangle([box[2] + 3, box[1], box[2] + win_w * 0.3, box[3]], fill=shutter)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
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
