"""Fill a hole in a user's image of any size and mode: `cectl inpaint` and the page of
`cectl serve` both read the image with `read_image` and fill it with `fill`.

The network sees a square context window around the hole, so the aspect ratio is kept.
Its side is the image's shorter side, or more where the hole needs it to lie where the
model fills (the central window of a center model; anywhere for a random-mask model).
It is centred on the hole, then moved into the image as far as that allows; where it
still overhangs the image, edge pixels are repeated. The square is scaled to the
network's input size, the prediction scaled back to the square, and only the hole's own
pixels are replaced, as test.lua does (hard paste; the overlap band the network also
predicts is not pasted). Every other pixel is left untouched. `--mask KIND` draws the
hole on the image's central largest square; for an image of the network's size nothing
is then scaled and the result is test.lua's. A mask file (or the one named after the
image in a folder) is the image's size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image, ImageOps
from torch import nn

from cectl.errors import BadInput
from cectl.images import MAX_PIXELS, Skip, decode, open_image, to_8bit_grey, to_rgb
from cectl.mask_files import hole_of, mask_grey, masks_by_key, trained_mask_files
from cectl.masks import (
    KINDS,
    Window,
    check_window,
    derive_seed,
    draw_holes,
    fill_holes,
    output_window,
)
from cectl.pixels import to_batch, to_model_range
from cectl.restore import load_generator
from cectl.runs import best_device
from cectl.sources import sample_key
from cectl.storage import open_store

KEEP_MODES = ("RGB", "RGBA", "L", "LA")


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Grey 128 or more (after conversion to grey) = hole; must match the image size."""
    try:
        grey = mask_grey(path.read_bytes())
    except (OSError, Skip):
        raise BadInput(f"mask {path} is not an image") from None
    if grey.size != size:
        raise BadInput(f"mask {path} is {grey.size[0]}x{grey.size[1]} but the image is "
                       f"{size[0]}x{size[1]}: give a mask of the image's size")
    hole = hole_of(grey)
    if not hole.any():
        raise BadInput(f"mask {path} has no white (hole) pixels")
    return hole


def read_image(data: bytes, name: str) -> Image.Image:
    """The upright image in a mode we can write back (L, LA, RGB or RGBA); `name` is what
    errors call it. Over `cectl.images.MAX_PIXELS` or undecodable: BadInput."""
    try:
        decode(data)  # the full decode, so that a damaged file is refused here
    except Skip as e:
        if e.reason == "too-large":
            raise BadInput(f"{name} has more than {MAX_PIXELS:,} pixels, the most an image "
                           "may have") from None
        raise BadInput(f"{name} is not a readable image ({e.reason})") from None
    image = ImageOps.exif_transpose(open_image(data))
    if image.mode.startswith("I"):  # 16-bit grey stays grey
        image = to_8bit_grey(image)
    if image.mode not in KEEP_MODES:  # P, CMYK, ...: keep alpha if it has one
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA") if has_alpha else to_rgb(image)
    return image


def drawn_hole(kind: str, size: tuple[int, int], cfg: DictConfig, seed: int,
               name: str) -> np.ndarray:
    """A hole of mask `kind` on the image's central largest square, scaled to the square
    (free-form: of the model's `mask` area; files: from its mask set)."""
    width, height = size
    image_size = cfg.data.image_size
    drawn = draw_holes(kind, 1, image_size, cfg.mask.overlap, derive_seed(seed, "inpaint"),
                       (cfg.mask.min_area, cfg.mask.max_area),
                       trained_mask_files(cfg) if kind == "files" else None)
    check_window(drawn, output_window(image_size, cfg.mask.kind), cfg.mask.kind)
    short = min(width, height)
    hole = np.zeros((height, width), dtype=bool)
    x, y = (width - short) // 2, (height - short) // 2
    hole[y : y + short, x : x + short] = F.interpolate(
        drawn.float(), size=(short, short), mode="nearest")[0, 0].numpy() > 0
    if not hole.any():
        raise BadInput(f"{name} is {width}x{height} px, too small for any pixel to fall in "
                       f"this model's {kind} hole: give a larger image")
    return hole


def context_square(hole: np.ndarray, window: Window, size: int) -> tuple[int, int, int]:
    """(x, y, side) of the square the network sees; it may overhang the image."""
    height, width = hole.shape
    ys, xs = np.nonzero(hole)
    # A network pixel that covers any hole pixel is a hole pixel: inside a central window,
    # keep one network pixel to spare on each side.
    spare = 0 if window.size == size else 1
    extent = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
    side = max(min(width, height),
               math.ceil((extent + spare) * size / (window.size - 2 * spare)))
    scale = side / size

    def start(first: int, end: int, length: int) -> int:
        lowest = math.ceil(end - (window.offset + window.size - spare) * scale)
        highest = math.floor(first - (window.offset + spare) * scale)
        if side > length:
            wanted = (length - side) // 2
        else:
            wanted = min(max((first + end - side) // 2, 0), length - side)
        return min(max(wanted, lowest), highest)

    return start(xs.min(), xs.max() + 1, width), start(ys.min(), ys.max() + 1, height), side


def cut_square(array: np.ndarray, x: int, y: int, side: int, mode: str) -> np.ndarray:
    """array[y : y + side, x : x + side], padded (np.pad `mode`) where it leaves the array."""
    height, width = array.shape[:2]
    pads = ((max(0, -y), max(0, y + side - height)), (max(0, -x), max(0, x + side - width)))
    if any(any(p) for p in pads):
        array = np.pad(array, pads + ((0, 0),) * (array.ndim - 2), mode=mode)
        x, y = x + pads[1][0], y + pads[0][0]
    return array[y : y + side, x : x + side]


def fill(generator: nn.Module, cfg: DictConfig, image: Image.Image,
         hole: np.ndarray) -> tuple[Image.Image, dict]:
    """`image` with its `hole` (True = fill, of the image's size) filled by the network,
    in the image's mode; and the context square the network saw ({x, y, side}). The
    network runs where its weights are."""
    device = next(generator.parameters()).device
    rgb = to_rgb(image)
    size = cfg.data.image_size
    window = output_window(size, cfg.mask.kind)
    x, y, side = context_square(hole, window, size)
    net_input = to_model_range(to_batch([cut_square(np.asarray(rgb), x, y, side, "edge")]))
    square_hole = torch.from_numpy(cut_square(hole, x, y, side, "constant"))[None, None]
    if side != size:
        net_input = F.interpolate(net_input, size=(size, size), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(-1, 1)
    # A network pixel is a hole if any image pixel it covers is.
    small = F.adaptive_max_pool2d(square_hole.float(), size) > 0
    with torch.no_grad():
        pred = generator(fill_holes(net_input.to(device), small.to(device))).float().cpu()
    canvas = net_input.clone()
    canvas[..., window.offset : window.offset + window.size,
           window.offset : window.offset + window.size] = pred
    if side != size:
        canvas = F.interpolate(canvas, size=(side, side), mode="bicubic", align_corners=False)
    canvas = canvas[0].add(1).mul(127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()

    ys, xs = np.nonzero(hole)
    filled = np.asarray(image.convert("RGB")).copy()
    filled[ys, xs] = canvas[ys - y, xs - x]
    patch = Image.fromarray(filled, "RGB")
    if image.mode in ("L", "LA"):
        patch = patch.convert("L")
    if image.mode in ("RGBA", "LA"):
        patch = Image.merge(image.mode, [*patch.split(), image.getchannel("A")])
    region = Image.fromarray(hole.astype(np.uint8) * 255, "L")
    result = Image.composite(patch.convert(image.mode), image, region)
    return result, {"x": x, "y": y, "side": side}


def mask_in_folder(folder: Path, image_path: Path) -> Path:
    """The mask in `folder` named after the image (any image extension; as `cectl eval
    --mask DIR` matches them)."""
    found = masks_by_key(open_store(str(folder)))
    key = sample_key(image_path.name)
    if key not in found:
        raise BadInput(f"{folder} has no mask named after {image_path.name} ({key}.png)")
    return folder / found[key]


def inpaint(image_path: Path, ckpt: str, mask: str, out_path: Path, seed: int = 0) -> dict:
    """`cectl inpaint`: fill IMG's hole (a mask kind, a mask file, or the mask named after
    IMG in a folder) and write OUT; on the GPU when there is one."""
    generator, cfg, _ = load_generator(ckpt)
    generator.to(best_device())
    try:
        data = image_path.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read {image_path}: {e.strerror}") from None
    image = read_image(data, str(image_path))
    if mask in KINDS:
        hole = drawn_hole(mask, image.size, cfg, seed, str(image_path))
    else:
        path = Path(mask)
        hole = read_mask(mask_in_folder(path, image_path) if path.is_dir() else path,
                         image.size)
    result, context = fill(generator, cfg, image, hole)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save(out_path)
    return {"out": str(out_path), "hole_pixels": int(hole.sum()), "size": list(image.size),
            "context": context}
