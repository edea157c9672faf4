"""`cectl inpaint`: fill a hole in a user's image of any size and mode.

The network runs at its own resolution on the whole image scaled to it; the prediction is
scaled back to the hole in the original image. Inside the hole the prediction is used;
in the band of `mask.overlap` px (scaled) around it, prediction and original are blended
with a weight that fades towards the context; every other pixel is left untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from cectl.checkpoint import load_generator
from cectl.data import to_batch, to_float
from cectl.errors import BadInput
from cectl.images import Skip, decode, open_image, to_8bit_grey
from cectl.masks import KINDS, check_window, derive_seed, draw_holes, output_window
from cectl.model import complete

KEEP_MODES = ("RGB", "RGBA", "L", "LA")


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Grey 128 or more (after conversion to grey) = hole; must match the image size."""
    try:
        mask = open_image(path.read_bytes())
        mask.load()
    except (OSError, ValueError, Skip):
        raise BadInput(f"mask {path} is not an image") from None
    if mask.size != size:
        raise BadInput(f"mask {path} is {mask.size[0]}x{mask.size[1]} but the image is "
                       f"{size[0]}x{size[1]}: give a mask of the image's size")
    grey = to_8bit_grey(mask) if mask.mode.startswith("I") else mask.convert("L")
    hole = np.asarray(grey) >= 128
    if not hole.any():
        raise BadInput(f"mask {path} has no white (hole) pixels")
    return hole


def _read_image(path: Path) -> tuple[Image.Image, Image.Image]:
    """(the upright original in a mode we can write back, its RGB version)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    try:
        decoded = decode(data)
    except Skip as e:
        raise BadInput(f"{path} is not a readable image ({e.reason})") from None
    original = ImageOps.exif_transpose(open_image(data))
    if original.mode.startswith("I"):  # 16-bit grey stays grey
        original = to_8bit_grey(original)
    if original.mode not in KEEP_MODES:  # P, CMYK, ...: keep alpha if it has one
        has_alpha = "A" in original.getbands() or "transparency" in original.info
        original = original.convert("RGBA") if has_alpha else decoded.image
    return original, decoded.image


def inpaint(image_path: Path, ckpt: str, mask: str, out_path: Path, seed: int = 0) -> dict:
    generator, cfg, _ = load_generator(ckpt)
    original, rgb = _read_image(image_path)
    width, height = rgb.size
    size = cfg.data.image_size
    window = output_window(size, cfg.mask.kind)

    if mask in KINDS:
        small = draw_holes(mask, 1, size, cfg.mask.overlap, derive_seed(seed, "inpaint"))
        hole = F.interpolate(small.float(), size=(height, width), mode="nearest")[0, 0] > 0
        if not hole.any():
            raise BadInput(f"{image_path} is {width}x{height} px, too small for any pixel to "
                           f"fall in this model's {mask} hole: give a larger image")
    else:
        hole = torch.from_numpy(read_mask(Path(mask), (width, height)))
        # A network pixel is a hole if any image pixel it covers is.
        small = F.adaptive_max_pool2d(hole[None, None].float(), size) > 0
    check_window(small, window, cfg.mask.kind)

    net_input = to_float(to_batch([np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC))]))
    with torch.no_grad():
        _, completed = complete(generator, net_input, small, window.offset)
    filled = F.interpolate(completed, size=(height, width), mode="bicubic", align_corners=False)
    filled = filled[0].add(1).mul(127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()

    # Blend weight: 1 in the hole, fading to 0 across the band of `mask.overlap` network
    # pixels around it. The fade is built at the network's resolution (cheap for any image
    # size); where it may touch is bounded at full resolution by dilating the hole itself.
    alpha = small.float()
    for _ in range(cfg.mask.overlap):
        fade = F.max_pool2d(alpha, 3, stride=1, padding=1) - 1 / (cfg.mask.overlap + 1)
        alpha = torch.maximum(alpha, fade)
    alpha = F.interpolate(alpha, size=(height, width), mode="bilinear", align_corners=False)
    band = math.ceil(cfg.mask.overlap * max(width, height) / size)
    near = hole[None, None].float()
    near = F.max_pool2d(near, (1, 2 * band + 1), stride=1, padding=(0, band))
    near = F.max_pool2d(near, (2 * band + 1, 1), stride=1, padding=(band, 0))
    alpha = (torch.maximum(alpha[0, 0], hole.float()) * near[0, 0]).numpy()[..., None]
    source = np.asarray(original.convert("RGB"), dtype=np.float32)
    blended = (alpha * filled + (1 - alpha) * source).round().astype(np.uint8)
    region = Image.fromarray((alpha[..., 0] > 0).astype(np.uint8) * 255, "L")
    patch = Image.fromarray(blended, "RGB")
    if original.mode in ("L", "LA"):
        patch = patch.convert("L")
    if original.mode in ("RGBA", "LA"):
        patch = Image.merge(original.mode, [*patch.split(), original.getchannel("A")])
    result = Image.composite(patch.convert(original.mode), original, region)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save(out_path)
    return {"out": str(out_path), "hole_pixels": int(hole.sum()), "size": [width, height],
            "changed_pixels": int((alpha > 0).sum())}
