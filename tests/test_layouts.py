"""Layouts: imagenet, paris and folder trees, detected and split as a user expects."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import shard_images
from PIL import Image

from cectl.sources import detect_layout, held_out, list_items


def write_images(root: Path, paths: list[str]) -> None:
    for i, rel in enumerate(paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 80), (i * 20 % 255, 100, 50)).save(root / rel, "JPEG")


def shard_manifest(src: Path, dst: Path, **flags) -> dict:
    shard_images(src, dst, **flags)
    return json.loads((dst / "manifest.json").read_text())


def test_imagenet_tree_keeps_wnid_labels_and_val_split(tmp_path):
    write_images(tmp_path / "in", ["train/n01440764/a.JPEG", "train/n01440764/b.JPEG",
                                   "train/n02102040/c.JPEG", "val/ILSVRC2012_val_1.JPEG",
                                   "val/n02102040/ILSVRC2012_val_2.JPEG", "test/x.JPEG"])
    manifest = shard_manifest(tmp_path / "in", tmp_path / "out")
    assert manifest["layout"] == "imagenet"
    assert manifest["splits"]["train"]["samples"] == 3
    assert manifest["splits"]["val"]["samples"] == 2
    import webdataset as wds

    labels = {s["__key__"]: json.loads(s["json"])["label"]
              for s in wds.WebDataset(str(tmp_path / "out/val/shard-000000.tar"),
                                      shardshuffle=False)}
    assert labels == {"val/ILSVRC2012_val_1": None,
                      "val/n02102040/ILSVRC2012_val_2": "n02102040"}


def test_paris_tree_uses_eval_gt_as_val():
    layout, items = list_items(["paris_train/1.jpg", "paris_train/2.jpg",
                                "paris_eval_gt/3_im.png"], "auto", 0.0, "src")
    assert layout == "paris"
    assert [(i.source, i.split) for i in items] == [("paris_eval_gt/3_im.png", "val"),
                                                    ("paris_train/1.jpg", "train"),
                                                    ("paris_train/2.jpg", "train")]


def test_forced_layout_beats_detection():
    layout, items = list_items(["paris_train/1.jpg", "other/2.jpg"], "folder", 0.0, "src")
    assert layout == "folder"
    assert [(i.source, i.split) for i in items] == [("other/2.jpg", "train"),
                                                    ("paris_train/1.jpg", "train")]


def test_detection_and_keys():
    assert detect_layout(["a/b.jpg"]) == "folder"
    assert detect_layout(["train/n01440764/x.JPEG"]) == "imagenet"
    layout, items = list_items(["x/a.b.jpg", "x/a_b.png", "x/.hidden.jpg", "notes.txt"],
                               "auto", 0.0, "src")
    assert layout == "folder"
    assert [i.source for i in items] == ["x/a.b.jpg", "x/a_b.png"]
    assert items[0].key == "x/a_b" and items[1].key.startswith("x/a_b_")  # clash resolved


def test_an_image_below_a_folder_named_like_webdataset_metadata_is_read_back():
    import io

    from cectl.shard_format import tar_samples, tar_writer

    _, items = list_items(["__bg__/a.jpg", "cats/b.jpg"], "folder", 0.0, "src")
    buf = io.BytesIO()
    with tar_writer(buf) as tar:
        for item in items:
            tar.write({"__key__": item.key, "jpg": b"x"})
    buf.seek(0)
    assert [s["__key__"] for s in tar_samples(buf, "s")] == [i.key for i in items]
    assert len(items) == 2


def test_val_fraction_holds_out_about_that_share_deterministically():
    keys = [f"img{i}" for i in range(4000)]
    chosen = [k for k in keys if held_out(k, 0.1)]
    assert 320 < len(chosen) < 480
    assert chosen == [k for k in keys if held_out(k, 0.1)]
