"""`cectl probe`: a linear classifier on frozen encoder features, next to a random encoder.

Features of every layer are extracted once per encoder and split, shard by shard (in this
process, or as Ray tasks over a cluster), into a cache of float16 .npy files keyed by
the encoder's weights and the split's shard digests; the classifier then streams them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from cectl.encoder import (
    BATCH,
    check_layers,
    layer_outputs,
    load_encoder,
    random_encoder,
    stack_features,
)
from cectl.errors import BadInput, CectlError
from cectl.pixels import eval_crop, sample_pixels, to_batch, to_model_range
from cectl.render import item_progress, status
from cectl.runs import best_device
from cectl.shard_format import open_manifest, read_samples
from cectl.storage import open_store


@torch.no_grad()
def shard_features(data_uri: str, shard: str, stacks: dict[str, nn.Sequential],
                   image_size: int) -> dict:
    """Features of every layer of every stack, labels and keys of one shard's samples."""
    device = best_device()
    samples = read_samples(open_store(data_uri), shard)
    labels = [json.loads(s["json"]).get("label") for s in samples]
    if None in labels:
        raise BadInput(f"{shard} in {data_uri} has samples without a label: shard an ImageNet "
                       "layout (wnid folders) or use `cectl shard --label-from folder`")
    chunks: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in stacks}
    for start in range(0, len(samples), BATCH):
        batch = samples[start : start + BATCH]
        images = to_model_range(to_batch([eval_crop(sample_pixels(s), image_size) for s in batch])
                          .to(device))
        for name, stack in stacks.items():
            for layer, value in stack_features(stack.to(device), images).items():
                chunks[name].setdefault(layer, []).append(value.cpu().half().numpy())
    return {"features": {n: {layer: np.concatenate(v) for layer, v in c.items()}
                         for n, c in chunks.items()},
            "labels": labels, "keys": [s["__key__"] for s in samples]}


def _digest(stack: nn.Sequential) -> str:
    h = hashlib.sha256()
    for key, value in stack.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_folder(cache_dir: Path, stack: nn.Sequential, manifest: dict, split: str,
                 image_size: int) -> Path:
    """One folder per encoder (by its weights) and split (by its shards' sha256)."""
    shards = [s["sha256"] for s in manifest["splits"][split]["shards"]]
    data = hashlib.sha256(json.dumps([shards, image_size]).encode()).hexdigest()[:16]
    return cache_dir / f"{_digest(stack)}-{split}-{data}"


# The features of a list of shards: (shard index, `shard_features` result), in any order.
ShardFeatures = Callable[[list[str]], Iterator[tuple[int, dict]]]
# Where shards are processed: (data_uri, stacks, image_size) -> ShardFeatures.
Extractor = Callable[[str, dict[str, nn.Sequential], int], ShardFeatures]


def local_extractor(data_uri: str, stacks: dict[str, nn.Sequential],
                  image_size: int) -> ShardFeatures:
    """Shards processed one after another in this process."""
    def results(shards: list[str]) -> Iterator[tuple[int, dict]]:
        for index, shard in enumerate(shards):
            yield index, shard_features(data_uri, shard, stacks, image_size)
    return results


@torch.no_grad()
def feature_dims(stack: nn.Sequential, image_size: int) -> dict[str, int]:
    """The number of features of each layer of `stack`, from one blank image."""
    blank = torch.zeros(1, 3, image_size, image_size, device=next(stack.parameters()).device)
    return {layer: value.shape[1] for layer, value in stack_features(stack, blank).items()}


def is_complete(folder: Path, images: int, dims: dict[str, int], layer: str) -> bool:
    """Whether a cache folder holds what its name promises: a label and a key per image,
    per layer a float16 (images, dims) array filling its file exactly, `layer`'s finite.
    Anything else (cut short, from another cectl, edited) is extracted again."""
    try:
        meta = json.loads((folder / "labels.json").read_text())
        if not (isinstance(meta, dict) and all(
                isinstance(meta.get(key), list) and len(meta[key]) == images
                for key in ("labels", "keys"))
                and all(isinstance(label, str | int) for label in meta["labels"])):
            return False
        for name, width in dims.items():
            path = folder / f"{name}.npy"
            array = np.load(path, mmap_mode="r")  # never unpickles
            if not (array.dtype == np.float16 and array.shape == (images, width)
                    and array.offset + array.nbytes == path.stat().st_size):
                return False
            if name == layer and not all(torch.isfinite(rows).all() for rows in _rows(array)):
                return False
    except (OSError, ValueError, RecursionError):  # missing, truncated, not JSON or .npy
        return False
    return True


def extract_split(data_uri: str, manifest: dict, split: str, stacks: dict[str, nn.Sequential],
                  image_size: int, layer: str, cache_dir: Path, extractor: Extractor,
                  console: Console) -> tuple[dict[str, Path], dict]:
    """The cache folder of each stack for `split`, extracting what is not cached yet (or
    cached wrong: see `is_complete`; `layer` is the one the probe reads).

    Each layer is a float16 .npy of (images, dims), rows in manifest order; labels.json,
    written last, marks a folder complete. Returns the folders and the pass's timing."""
    if split not in manifest["splits"]:
        raise BadInput(f"{data_uri} has no {split!r} split: the probe trains on 'train' and "
                       "scores 'val' (shard with --val-fraction)")
    folders = {n: cache_folder(cache_dir, s, manifest, split, image_size)
               for n, s in stacks.items()}
    shards = [s for s in manifest["splits"][split]["shards"] if s["samples"]]
    offsets = np.cumsum([0] + [s["samples"] for s in shards])
    dims = feature_dims(next(iter(stacks.values())), image_size)
    todo = {n: s for n, s in stacks.items()
            if not is_complete(folders[n], int(offsets[-1]), dims, layer)}
    if not todo:
        return folders, {"images": 0, "seconds": 0.0, "encoders": 0}
    partial = {n: folders[n].with_name(folders[n].name + ".partial") for n in todo}
    arrays: dict[str, dict[str, np.ndarray]] = {n: {} for n in todo}
    labels, keys = [None] * offsets[-1], [None] * offsets[-1]
    start = time.perf_counter()
    with item_progress(console) as progress:
        bar = progress.add_task(f"features: {split}", total=int(offsets[-1]))
        for index, result in extractor(data_uri, todo, image_size)([s["name"] for s in shards]):
            a, b = offsets[index], offsets[index + 1]
            labels[a:b], keys[a:b] = result["labels"], result["keys"]
            for name, layers in result["features"].items():
                for layer, values in layers.items():
                    if layer not in arrays[name]:
                        partial[name].mkdir(parents=True, exist_ok=True)
                        arrays[name][layer] = np.lib.format.open_memmap(
                            partial[name] / f"{layer}.npy", "w+", np.float16,
                            (int(offsets[-1]), values.shape[1]))
                    arrays[name][layer][a:b] = values
            progress.advance(bar, int(b - a))
    timing = {"images": int(offsets[-1]), "seconds": time.perf_counter() - start,
              "encoders": len(todo)}
    for name in todo:
        for array in arrays[name].values():
            array.flush()
        (partial[name] / "labels.json").write_text(json.dumps({"labels": labels, "keys": keys}))
        shutil.rmtree(folders[name], ignore_errors=True)
        partial[name].rename(folders[name])
    return folders, timing


@contextlib.contextmanager
def ray_extractor(nodes: int, gpus_per_node: int, cpu: bool,
                address: str | None) -> Iterator[Extractor]:
    """Shards processed as Ray tasks spread over the cluster, one GPU (or CPU) each.

    The cluster is joined and checked as for training. Shards are independent, so plain
    tasks do (no process group); each result goes straight into the driver's cache."""
    from cectl.cluster import join_cluster

    workers, _ = join_cluster((nodes, nodes), gpus_per_node, cpu, address)
    import ray

    try:
        task = ray.remote(shard_features).options(num_cpus=1, num_gpus=0 if cpu else 1,
                                                  scheduling_strategy="SPREAD")

        def factory(data_uri: str, stacks: dict[str, nn.Sequential],
                    image_size: int) -> ShardFeatures:
            stacks_ref = ray.put(stacks)

            def results(shards: list[str]) -> Iterator[tuple[int, dict]]:
                waiting, running = list(enumerate(shards)), {}
                while waiting or running:
                    # A bounded number in flight, so results never pile up in Ray's store.
                    while waiting and len(running) < 2 * workers:
                        index, shard = waiting.pop(0)
                        running[task.remote(data_uri, shard, stacks_ref, image_size)] = index
                    done, _ = ray.wait(list(running), num_returns=1)
                    try:
                        result = ray.get(done[0])
                    except ray.exceptions.RayTaskError as e:
                        if isinstance(e.cause, CectlError):
                            raise e.cause from None
                        raise
                    yield running.pop(done[0]), result
            return results

        yield factory
    finally:
        ray.shutdown()


def _rows(array: np.ndarray, chunk: int = 4096) -> Iterator[torch.Tensor]:
    for start in range(0, len(array), chunk):
        yield torch.from_numpy(np.asarray(array[start : start + chunk], dtype=np.float32))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                 val_y: np.ndarray, classes: int, epochs: int, batch_size: int = 256,
                 lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """A linear classifier on standardised features, minibatch Adam, cosine-decayed lr.

    Features stay on disk (memmaps): the mean and spread come from one streamed pass, and
    each step reads one minibatch of rows, so memory does not grow with the data set."""
    total = torch.zeros(train_x.shape[1], dtype=torch.float64)
    for rows in _rows(train_x):
        total += rows.double().sum(0)
    mean = (total / len(train_x)).float()
    sq = torch.zeros_like(total)
    for rows in _rows(train_x):
        sq += (rows - mean).double().square().sum(0)
    std = (sq / len(train_x)).sqrt().float().clamp_min(1e-6)
    torch.manual_seed(seed)
    classifier = nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(seed)
    targets = torch.from_numpy(train_y)
    for _ in range(epochs):
        order = rng.permutation(len(train_x))
        for start in range(0, len(order), batch_size):
            index = np.sort(order[start : start + batch_size])
            x = (torch.from_numpy(np.asarray(train_x[index], dtype=np.float32)) - mean) / std
            loss = F.cross_entropy(classifier(x), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    top1 = top5 = 0
    with torch.no_grad():
        for start, rows in zip(range(0, len(val_x), 4096), _rows(val_x), strict=True):
            ranked = classifier((rows - mean) / std).topk(min(5, classes), dim=1).indices
            truth = torch.from_numpy(val_y[start : start + len(rows)]).unsqueeze(1)
            top1 += (ranked[:, :1] == truth).sum().item()
            top5 += (ranked == truth).any(1).sum().item()
    return {"top1_pct": 100 * top1 / len(val_x), "top5_pct": 100 * top5 / len(val_x)}


def run_probe(ckpt_uri: str, data_uri: str, layer: str | None, epochs: int, cache_dir: Path,
              console: Console, extractor: Extractor = local_extractor) -> dict:
    """Probe the checkpoint's encoder and a random one, trained on `train`, scored on `val`."""
    model, cfg, origin = load_encoder(ckpt_uri)
    layer = layer or list(layer_outputs(model))[-1]
    check_layers(model, cfg.model.arch, layer)
    stacks = {"model": model, "random": random_encoder(cfg)}
    manifest = open_manifest(data_uri)
    size = cfg.data.image_size
    split_data, timings = {}, []
    for split in ("train", "val"):
        folders, timing = extract_split(data_uri, manifest, split, stacks, size, layer,
                                        cache_dir, extractor, console)
        split_data[split] = folders
        timings.append(timing)
    meta = {s: json.loads((f["model"] / "labels.json").read_text())
            for s, f in split_data.items()}
    classes = sorted(set(meta["train"]["labels"]))
    index = {label: i for i, label in enumerate(classes)}
    # A val label the train split never shows cannot be predicted: it counts as a miss.
    labels = {s: np.array([index.get(x, -1) for x in m["labels"]]) for s, m in meta.items()}
    scores, dims = {}, 0
    for name in stacks:
        with status(console, f"training the linear probe on the {name} encoder's {layer}"):
            x = {s: np.load(f[name] / f"{layer}.npy", mmap_mode="r")
                 for s, f in split_data.items()}
            dims = x["train"].shape[1]
            scores[name] = linear_probe(x["train"], labels["train"], x["val"], labels["val"],
                                        len(classes), epochs)
    images = sum(t["images"] for t in timings)
    seconds = sum(t["seconds"] for t in timings)
    return {**origin, "arch": cfg.model.arch, "layer": layer, "dims": int(dims),
            "classes": len(classes), "train_images": len(labels["train"]),
            "val_images": len(labels["val"]), "epochs": epochs, **scores,
            "extraction": {"images": images, "seconds": seconds,
                           "images_per_s": images / seconds if seconds else None,
                           "encoders_per_pass": max(t["encoders"] for t in timings)},
            "cache": str(cache_dir)}
