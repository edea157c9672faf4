"""The user's own masks: sets read once per machine, holes placed per position, masks
matched to images by name."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused, shard_images
from helpers import mask_png as png
from PIL import Image

from cectl import mask_files
from cectl.errors import BadInput
from cectl.mask_files import image_masks, open_mask_files
from cectl.masks import draw_holes, holes_for_positions


@pytest.fixture(autouse=True)
def machine(tmp_path, monkeypatch) -> Path:
    """A machine of this test's own: its cache folder under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


def blob(height: int, width: int) -> np.ndarray:
    """An off-centre ellipse: no flip of it is another."""
    y, x = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]
    return ((y - 0.3) / 0.25) ** 2 + ((x - 0.3) / 0.2) ** 2 < 1


def write_masks(folder: Path) -> None:
    """Good masks of various sizes and modes, and bad files of every kind."""
    folder.mkdir(parents=True)
    for name, (height, width) in {"a": (64, 64), "b": (30, 200), "c": (300, 70),
                                  "sub/d": (17, 23)}.items():
        (folder / f"{name}.png").parent.mkdir(exist_ok=True)
        (folder / f"{name}.png").write_bytes(png(blob(height, width)))
    (folder / "rgba.png").write_bytes(png(blob(50, 40), "RGBA"))
    (folder / "grey16.png").write_bytes(png(blob(40, 50), "I;16"))
    (folder / "truncated.png").write_bytes(png(blob(64, 64))[:60])
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "black.png").write_bytes(png(np.zeros((20, 20), bool)))
    (folder / "README.txt").write_text("masks, white = hole")  # not an image file: ignored


def test_a_folder_of_masks_is_read_once_per_machine_and_its_bad_files_counted(tmp_path,
                                                                               machine):
    write_masks(tmp_path / "masks")
    masks = open_mask_files(str(tmp_path / "masks"), 32)
    assert masks.count == 6
    assert masks.skipped == {"corrupt": 1, "not-an-image": 1, "empty": 1, "no-hole": 1}
    assert sorted(Path(s["path"]).name for s in masks.skipped_files) == [
        "black.png", "empty.png", "text.png", "truncated.png"]
    assert sorted(map(tuple, masks.shapes.tolist())) == [
        (5, 32), (24, 32), (26, 32), (32, 7), (32, 26), (32, 32)]  # longer side to 32
    assert masks.bits.shape == (6, 32, 4)
    # The next process, or run, on this machine maps the same file.
    reads = []
    real = mask_files._write
    mask_files._write = lambda *args: reads.append(args) or real(*args)
    try:
        again = open_mask_files(str(tmp_path / "masks"), 32)
        assert again.path == masks.path and not reads
        # A changed mask is another listing: read anew.
        (tmp_path / "masks" / "a.png").write_bytes(png(blob(64, 64).T))
        assert open_mask_files(str(tmp_path / "masks"), 32).path != masks.path
        assert len(reads) == 1
    finally:
        mask_files._write = real
    assert sorted(p.suffix for p in machine.glob("cectl-shard-cache-*/masks-*")) == [
        ".json", ".json", ".lock", ".lock", ".npy", ".npy"]


def test_a_hole_is_a_mask_of_the_set_flipped_and_placed_from_its_position(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    mask = blob(40, 20)
    (folder / "one.png").write_bytes(png(mask))
    masks = open_mask_files(str(folder), 32)
    fitted = mask_files.fit(Image.fromarray(mask.astype(np.uint8) * 255), 32)  # 32 x 16
    flips = {flipped.tobytes(): name for name, flipped in (
        ("none", fitted), ("x", fitted[:, ::-1]), ("y", fitted[::-1]), ("xy", fitted[::-1, ::-1]))}
    holes = holes_for_positions("files", range(500, 600), 32, 2, 9, files=masks)
    seen, offsets = set(), set()
    for hole in holes[:, 0].numpy():
        # The whole mask, flipped, somewhere along the image's width (its height is 32).
        placed = [(flips[hole[:, x : x + 16].tobytes()], x) for x in range(17)
                  if hole[:, x : x + 16].tobytes() in flips
                  and hole[:, x : x + 16].sum() == hole.sum()]
        assert placed
        seen.add(placed[0][0])
        offsets.add(np.nonzero(hole)[1].min())
    assert seen == {"none", "x", "y", "xy"} and len(offsets) > 5
    # A hole depends on its position alone, not on the batch it is drawn in.
    parts = [holes_for_positions("files", range(a, b), 32, 2, 9, files=masks)
             for a, b in ((500, 533), (533, 600))]
    assert torch.equal(torch.cat(parts), holes)
    assert torch.equal(draw_holes("files", 8, 32, 2, 4, files=masks),
                       draw_holes("files", 8, 32, 2, 4, files=masks))


def test_shards_of_masks_and_an_s3_folder_give_the_masks_of_the_folder(tmp_path, bucket):
    from cectl.storage import open_store

    write_masks(tmp_path / "masks")
    folder = open_mask_files(str(tmp_path / "masks"), 32)
    shard_images(tmp_path / "masks", tmp_path / "shards", resize=0, min_size=1)
    remote = open_store(f"s3://{bucket}/masks")
    for path in (tmp_path / "masks").rglob("*"):
        if path.is_file():
            remote.write_bytes(path.relative_to(tmp_path / "masks").as_posix(), path.read_bytes())

    def masks_of(files):
        return sorted(bits.tobytes() for bits in np.asarray(files.bits))

    sharded = open_mask_files(str(tmp_path / "shards"), 32)
    assert masks_of(sharded) == masks_of(folder)
    assert sharded.skipped == {"no-hole": 1}  # `cectl shard` skipped the unreadable ones
    on_s3 = open_mask_files(f"s3://{bucket}/masks", 32)
    assert masks_of(on_s3) == masks_of(folder) and on_s3.skipped == folder.skipped
    assert open_mask_files(f"s3://{bucket}/masks", 32).path == on_s3.path


def test_a_source_without_usable_masks_is_refused(tmp_path):
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("no masks here")
    with pytest.raises(BadInput) as caught:
        open_mask_files(str(tmp_path / "none"), 32)
    assert_refused(caught.value, 2, str(tmp_path / "none"), "no mask images")
    (tmp_path / "black").mkdir()
    (tmp_path / "black" / "m.png").write_bytes(png(np.zeros((8, 8), bool)))
    with pytest.raises(BadInput) as caught:
        open_mask_files(str(tmp_path / "black"), 32)
    assert_refused(caught.value, 2, "1 no-hole", "white")


def test_masks_named_after_images_are_cut_as_the_images_are(tmp_path):
    folder = tmp_path / "masks"
    (folder / "val").mkdir(parents=True)
    wide = np.zeros((60, 120), bool)
    wide[20:40, 50:70] = True  # in the centre: inside the central square
    (folder / "val" / "img-1.png").write_bytes(png(wide))
    square = np.zeros((32, 32), bool)
    square[:4, :4] = True
    (folder / "img.2.jpg").write_bytes(png(square))  # named as the sample key img_2
    holes = image_masks(str(folder), ["val/img-1", "img_2"], 32)
    expected = np.zeros((32, 32), bool)
    expected[11:21, 11:21] = True  # scaled to a shorter side of 32, its central square
    assert holes.shape == (2, 1, 32, 32)
    assert np.array_equal(holes[0, 0].numpy(), expected)
    assert torch.equal(holes[1, 0], torch.from_numpy(square))
    with pytest.raises(BadInput) as caught:
        image_masks(str(folder), ["val/img-1", "val/img-3", "img-4"], 32)
    assert_refused(caught.value, 2, "2 of the 3", "'val/img-3'", str(folder / "val/img-3.png"))
    edge = np.zeros((60, 120), bool)
    edge[:, :10] = True
    (folder / "val" / "img-1.png").write_bytes(png(edge))
    with pytest.raises(BadInput) as caught:
        image_masks(str(folder), ["val/img-1"], 32)
    assert_refused(caught.value, 2, str(folder / "val/img-1.png"), "no hole")


def test_two_masks_named_for_one_image_are_refused(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    square = np.zeros((32, 32), bool)
    square[:4, :4] = True
    (folder / "2023.05.01.png").write_bytes(png(square))
    (folder / "2023_05_01.png").write_bytes(png(~square))  # the same sample key
    with pytest.raises(BadInput) as caught:
        image_masks(str(folder), ["2023_05_01"], 32)
    assert_refused(caught.value, 2, str(folder / "2023.05.01.png"),
                   str(folder / "2023_05_01.png"), "'2023_05_01'")
