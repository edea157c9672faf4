"""Decoding any input into an upright RGB sample."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import encode as encoded
from PIL import Image

from cectl.images import Skip, decode, prepare_sample


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_every_mode_becomes_rgb_jpeg(mode):
    img = Image.new(mode, (120, 90))
    fmt = "TIFF" if mode in ("CMYK",) else "PNG"
    payload, ext, meta = prepare_sample(encoded(img, fmt), resize=350, quality=90, min_size=64)
    out = Image.open(io.BytesIO(payload))
    assert (ext, out.format, out.mode, out.size) == ("jpg", "JPEG", "RGB", (120, 90))
    assert meta == {"width": 120, "height": 90}


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.full((80, 80), 32768, dtype=np.uint16)
    rgb = decode(encoded(Image.fromarray(arr), "PNG")).image
    assert np.asarray(rgb)[0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    assert np.asarray(decode(encoded(img, "PNG")).image)[0, 0].tolist() == [255, 255, 255]


def test_shorter_side_is_resized_down_and_never_up():
    big, _, _ = prepare_sample(encoded(Image.new("RGB", (1000, 700)), "JPEG"), 350, 95, 64)
    small, _, _ = prepare_sample(encoded(Image.new("RGB", (300, 200)), "JPEG"), 350, 95, 64)
    assert Image.open(io.BytesIO(big)).size == (500, 350)
    assert Image.open(io.BytesIO(small)).size == (300, 200)


def test_resize_zero_keeps_rgb_png_and_jpeg_bytes():
    rgb = Image.effect_noise((100, 100), 30).convert("RGB")
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        data = encoded(rgb, fmt)
        assert prepare_sample(data, 0, 95, 64)[:2] == (data, ext)


def test_resize_zero_reencodes_grey_png_losslessly():
    grey = Image.effect_noise((100, 100), 30)
    payload, ext, _ = prepare_sample(encoded(grey, "PNG"), 0, 95, 64)
    out = Image.open(io.BytesIO(payload))
    assert ext == "png" and out.mode == "RGB"
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(grey))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encoded(Image.new("RGB", (200, 100)), "JPEG", exif=exif.tobytes())
    upright = decode(data)
    assert upright.image.size == (100, 200) and not upright.upright
    payload, _, meta = prepare_sample(data, 0, 95, 64)
    assert payload != data and Image.open(io.BytesIO(payload)).size == (100, 200)
    assert meta == {"width": 200, "height": 100}


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"hello, not an image", "not-an-image"),
     (encoded(Image.new("RGB", (300, 300)), "JPEG")[:400], "corrupt")],
)
def test_bad_bytes_are_skipped_with_a_reason(data, reason):
    with pytest.raises(Skip) as info:
        decode(data)
    assert info.value.reason == reason


@pytest.mark.parametrize("size", [(467, 350), (1200, 900), (700, 1300), (351, 350)])
@pytest.mark.parametrize("load_size", [350, 128])
def test_the_loader_decodes_shard_jpegs_to_the_same_pixels_as_pillow(size, load_size):
    import random

    from cectl.pixels import plan_crop, sample_pixels

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
    sample = {"jpg": encoded(img, "JPEG", quality=90)}
    pillow = np.asarray(decode(sample["jpg"], draft_to=load_size).image)
    crop = plan_crop(sample, load_size, 64, random.Random(0))
    loader = sample_pixels(sample, crop.decoded)
    assert loader.shape == pillow.shape and np.array_equal(loader, pillow)


@pytest.mark.parametrize("size", [(467, 350), (300, 227), (900, 700)])
def test_training_crops_are_those_of_a_plain_pillow_pipeline_with_flips(size):
    import random

    from cectl.images import resize_shorter
    from cectl.pixels import train_sample

    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    jpeg = encoded(Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC), "JPEG")
    for seed in range(5):
        img = resize_shorter(decode(jpeg, draft_to=350).image, 350, upscale=True)
        pick = random.Random(seed)
        x, y = pick.randint(0, img.size[0] - 128), pick.randint(0, img.size[1] - 128)
        crop = img.crop((x, y, x + 128, y + 128))
        if pick.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected = np.asarray(crop)
        got = train_sample({"jpg": jpeg}, 350, 128, random.Random(seed))
        assert np.array_equal(got, expected)
