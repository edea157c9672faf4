"""The shard format: WebDataset tars and the manifest that lists them.

A shard store holds `manifest.json` and, per split (`train`, `val`), tar shards named
`SPLIT/shard-NNNNNN.tar`. A sample is the tar members that share a key: the image
(`.jpg` or `.png`) and `.json` metadata (source path, stored size, label). Shards are
written with webdataset's TarWriter and read back with its tar iterator, so cectl and any
WebDataset pipeline agree on what a sample is. The manifest records every shard's sample
count, byte size and sha256, and is checked as data before anything trusts it.
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, NamedTuple

from cectl.errors import BadInput
from cectl.schema import is_count
from cectl.storage import Store, open_store, safe_key

if TYPE_CHECKING:
    import webdataset as wds

FORMAT = "cectl-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
IMAGE_KEYS = ("jpg", "png")  # the member holding a sample's image
SHA256 = re.compile(r"[0-9a-f]{64}")


def tar_writer(stream: IO[bytes]) -> wds.TarWriter:
    """A webdataset TarWriter whose output depends only on the samples written.

    Entries get fixed metadata (mtime 0, mode 0644, no user or group, ids 0) and PAX
    headers for long or non-ASCII keys; values are written as the bytes given (no encoder).
    """
    # Imported here: webdataset pulls in torch, which only the workers that write need.
    import webdataset as wds

    return wds.TarWriter(stream, encoder=False, mtime=0, mode=0o644, user="", group="",
                         format="PAX_FORMAT")


def tar_samples(stream: IO[bytes], name: str) -> Iterator[dict]:
    """The samples of one shard, raw bytes by extension, by webdataset's key rule."""
    import webdataset as wds

    def members() -> Iterator[dict]:
        # A plain tar, as cectl writes it and training reads it (webdataset's own reader
        # would inflate a compressed one, each member whole in memory, before any check).
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if _kept(info):
                    yield {"fname": info.name, "data": tar.extractfile(info).read(),
                           "__url__": name}
                tar.members = []  # a stream: nothing to go back to

    return wds.tariterators.group_by_keys(members())


def webdataset_metadata(name: str) -> bool:
    """Whether webdataset's readers skip a tar member of this name as metadata: `__NAME__`,
    or any name below a `__NAME__/` folder."""
    meta = "/" not in name and name.startswith("__") and name.endswith("__")
    return meta or re.match(r"__[^/]*__($|/)", name) is not None


def _kept(info: tarfile.TarInfo) -> bool:
    """A member webdataset's tar_file_iterator keeps: a file, not metadata."""
    return info.isreg() and not webdataset_metadata(info.name)


def read_samples(store: Store, name: str) -> list[dict]:
    """All samples of one shard, in order (evaluation and the feature commands read
    through this; training reads single images through `index_tar`)."""
    with readable_shard(store, name), store.open(name) as f:
        return list(tar_samples(f, name))


class ImageEntry(NamedTuple):
    """Where a sample's image lies in its shard: the sample's key, the image's extension
    (empty when the sample has none) and its bytes' offset and size in the tar."""

    key: str
    ext: str
    offset: int
    size: int


def index_tar(file: IO[bytes], store: Store, name: str) -> list[ImageEntry]:
    """The samples of a shard (`file`, seekable) by the rules of `tar_samples`, from the
    tar headers alone: no member is read."""
    import webdataset as wds

    def members() -> Iterator[dict]:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for info in tar:
                if _kept(info):
                    yield {"fname": info.name, "data": (info.offset_data, info.size),
                           "__url__": name}

    with readable_shard(store, name):
        samples = list(wds.tariterators.group_by_keys(members()))
    entries = []
    for sample in samples:
        ext = next((k for k in IMAGE_KEYS if k in sample), "")
        offset, size = sample[ext] if ext else (0, 0)
        entries.append(ImageEntry(sample["__key__"], ext, offset, size))
    return entries


@contextlib.contextmanager
def readable_shard(store: Store, name: str) -> Iterator[None]:
    """A missing or unreadable shard, in one sentence."""
    try:
        yield
    except FileNotFoundError:
        raise BadInput(f"shard {store.url(name)} is missing: run `cectl verify`") from None
    except (tarfile.TarError, ValueError) as e:
        raise BadInput(f"shard {store.url(name)} is not a readable tar ({e}): run "
                       "`cectl verify`") from None


def shard_names(manifest: dict) -> list[tuple[str, dict]]:
    """(split, shard entry) for every shard of a manifest."""
    return [(split, s) for split, info in manifest["splits"].items() for s in info["shards"]]


def read_manifest(store: Store) -> dict:
    """DST's manifest, checked as data: the rest of cectl may trust its shape and names."""
    where = store.url(MANIFEST)
    if not store.exists(MANIFEST):
        raise BadInput(f"{where} not found: run `cectl shard` into this location first")
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError, RecursionError):  # also nesting too deep to read
        raise BadInput(f"{where} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInput(f"{where} is not a cectl shard manifest")
    if problem := manifest_problem(manifest):
        raise BadInput(f"{where} is damaged ({problem}): shard the images again")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable, or None: shapes, counts, shard names under DST."""
    splits, totals = manifest.get("splits"), manifest.get("totals")
    if not isinstance(splits, dict) or not isinstance(totals, dict):
        return "splits and totals must be mappings"
    for split, info in splits.items():
        if split not in SPLITS:
            return f"unknown split {split!r}"
        if not (isinstance(info, dict) and isinstance(info.get("shards"), list)
                and is_count(info.get("samples")) and is_count(info.get("bytes"))):
            return f"split {split} needs a list of shards and sample and byte counts"
        for shard in info["shards"]:
            if not (isinstance(shard, dict) and is_count(shard.get("samples"))
                    and is_count(shard.get("bytes")) and isinstance(shard.get("sha256"), str)):
                return f"a {split} shard needs a name, sample and byte counts and a sha256"
            name = shard.get("name")
            if not (isinstance(name, str) and name.startswith(f"{split}/") and safe_key(name)):
                return f"{split} shard name {name!r} is not a path inside {split}/"
            if not SHA256.fullmatch(shard["sha256"]):  # it names the shard's cached copy
                return f"{split} shard {name} has a sha256 that is not 64 hex digits"
        for key in ("samples", "bytes"):
            if info[key] != sum(shard[key] for shard in info["shards"]):
                return f"the {split} {key} do not add up"
    counts = {"samples": sum(info["samples"] for info in splits.values()),
              "shards": sum(len(info["shards"]) for info in splits.values()),
              "bytes": sum(info["bytes"] for info in splits.values())}
    if any(totals.get(key) != value for key, value in counts.items()):
        return "the totals do not add up"
    return None


def open_manifest(data_uri: str) -> dict:
    """The checked manifest of the shards at `data_uri`."""
    store = open_store(data_uri)
    store.check()
    return read_manifest(store)
