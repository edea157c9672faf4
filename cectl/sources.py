"""The "reader" stage of sharding: which files of SRC become samples, in which split.

Layouts: `imagenet` (train/<wnid>/*.JPEG; val/ flat or in wnid folders), `paris`
(paris_train/ and paris_eval_gt/), `folder` (any nested tree); `auto` picks one.
Labels: the wnid in the imagenet layout; with `label_from=folder` (folder layout only),
the top-level folder under SRC.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cectl.errors import BadInput
from cectl.shard_format import webdataset_metadata

INPUT_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
WNID = re.compile(r"n\d{8}")
UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


@dataclass(frozen=True)
class Item:
    key: str  # sample key inside the shards
    source: str  # key of the input file in the SRC store
    split: str  # train | val
    label: str | None


def detect_layout(paths: list[str]) -> str:
    if any(p.startswith(("paris_train/", "paris_eval_gt/")) for p in paths):
        return "paris"
    if any((parts := p.split("/"))[0] == "train" and len(parts) > 2 and WNID.fullmatch(parts[1])
           for p in paths):
        return "imagenet"
    return "folder"


def _place(path: str, layout: str, label_from: str) -> tuple[str, str | None] | None:
    """(split, label) of an input path, or None when the layout does not use it."""
    parts = path.split("/")
    if layout == "folder":
        return "train", parts[0] if label_from == "folder" and len(parts) > 1 else None
    if layout == "paris":
        return {"paris_train": ("train", None), "paris_eval_gt": ("val", None)}.get(parts[0])
    if parts[0] == "train" and len(parts) == 3 and WNID.fullmatch(parts[1]):
        return "train", parts[1]
    if parts[0] == "val":
        wnid = parts[1] if len(parts) == 3 and WNID.fullmatch(parts[1]) else None
        return "val", wnid
    return None


def held_out(key: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the key, independent of order and seed."""
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def sample_key(path: str) -> str:
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    key = UNSAFE.sub("_", stem)
    # The sample's members (KEY.jpg, KEY.json) must not read as metadata, which
    # webdataset's readers drop: as below a folder named `__NAME__`.
    return f"-{key[1:]}" if webdataset_metadata(f"{key}.json") else key


def list_items(
    paths: list[str], layout: str, val_fraction: float, where: str, label_from: str = "layout"
) -> tuple[str, list[Item]]:
    """The layout used and the items of SRC (`where`), sorted by source path."""
    images = sorted(p for p in paths if not p.rsplit("/", 1)[-1].startswith(".")
                    and "." + p.rsplit(".", 1)[-1].lower() in INPUT_EXTENSIONS)
    if not images:
        raise BadInput(f"no image files found in {where}: give the folder that holds the images")
    if layout == "auto":
        layout = detect_layout(images)
    if label_from == "folder" and layout != "folder":
        raise BadInput(f"--label-from folder labels the folder layout, but {where} has the "
                       f"{layout!r} layout: add --layout folder")
    items, seen = [], set()
    for path in images:
        place = _place(path, layout, label_from)
        if place is None:
            continue
        split, label = place
        key = sample_key(path)
        if key in seen:  # a.b.jpg and a_b.png would clash
            key = f"{key}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        seen.add(key)
        if split == "train" and val_fraction > 0 and held_out(key, val_fraction):
            split = "val"
        items.append(Item(key, path, split, label))
    if not items:
        raise BadInput(f"no images in {where} where the {layout!r} layout expects them; "
                       "try --layout folder")
    return layout, items
