"""Feature learning (sec. 5.2, Fig. 8): the encoder alone, a linear probe, nearest neighbours.

A checkpoint's encoder becomes a plain feature stack: named Conv2d / ReLU (LeakyReLU 0.2
for dcgan128) / MaxPool2d / Flatten / Linear modules, every BatchNorm folded into the
layer before it with its running statistics, so a torch.nn stack of the same shape,
without BN, computes the same features. `export` writes that stack; `probe` and
`neighbors` compute features with it.

Layers: alexnet227 conv1 pool1 conv2 pool2 conv3 conv4 conv5 pool5 (with
`model.pool_free`, poolK is a stride-2 conv); dcgan128 conv1 .. convN and fc (the
bottleneck). A conv layer's features are taken after its activation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console
from safetensors.torch import save as save_tensors
from torch import nn

from cectl.checkpoint import load_generator
from cectl.data import (
    eval_crop,
    open_manifest,
    sample_pixels,
    split_batches,
    to_batch,
    to_float,
)
from cectl.errors import BadInput, CectlError
from cectl.images import Skip, decode
from cectl.masks import draw_holes, fill_holes
from cectl.shard import make_progress, read_samples
from cectl.storage import open_store

FORMAT = "cectl-encoder/1"
NORMALISATION = "RGB, x / 127.5 - 1 (range [-1, 1]), center crop of the shorter side"
# Conv features are average-pooled to at most this many values per image: pool5's
# 6x6x256, the size linear-probe protocols use for every layer.
PROBE_DIMS = 9216
RANDOM_SEED = 0  # of the random-encoder baseline
BATCH = 64


def _fold(layer: nn.Conv2d | nn.Linear, bn: nn.Module | None) -> nn.Module:
    """A plain copy of `layer` (with a bias) that computes `bn(layer(x))` in eval mode."""
    weight = layer.weight.detach().clone()
    bias = (layer.bias.detach().clone() if layer.bias is not None
            else torch.zeros(weight.shape[0]))
    if bn is not None:
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
        bias = (bias - bn.running_mean) * scale + bn.bias.detach()
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features)
    else:
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                          layer.stride, layer.padding)
    plain.weight.data, plain.bias.data = weight, bias
    return plain


def feature_stack(encoder: nn.Sequential) -> nn.Sequential:
    """The plain, BN-folded, named copy of a generator's encoder, in eval mode."""
    layers: list[tuple[nn.Module, nn.Module | None]] = []  # (module, the BN after it)
    for module in encoder:
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            layers[-1] = (layers[-1][0], module)
        else:
            layers.append((module, None))
    named: dict[str, nn.Module] = {}
    convs = 0
    for i, (module, bn) in enumerate(layers):
        activated = i + 1 < len(layers) and isinstance(layers[i + 1][0], nn.ReLU | nn.LeakyReLU)
        if isinstance(module, nn.Linear):
            named["fc"] = _fold(module, bn)
        elif isinstance(module, nn.Conv2d) and activated:
            convs += 1
            named[f"conv{convs}"] = _fold(module, bn)
        elif isinstance(module, nn.Conv2d):  # the pool-free encoder's strided downsampling
            named[f"pool{convs}"] = _fold(module, bn)
        elif isinstance(module, nn.MaxPool2d):
            named[f"pool{convs}"] = nn.MaxPool2d(module.kernel_size, module.stride)
        elif isinstance(module, nn.ReLU | nn.LeakyReLU):
            # Not in place: a layer's features are read after its activation, in passing.
            named["relufc" if "fc" in named else f"relu{convs}"] = (
                nn.LeakyReLU(module.negative_slope) if isinstance(module, nn.LeakyReLU)
                else nn.ReLU())
        elif isinstance(module, nn.Flatten):
            named["flatten"] = nn.Flatten()
        else:
            raise ValueError(f"no plain equivalent for {type(module).__name__}")
    return nn.Sequential(OrderedDict(named)).eval()


def layer_outputs(stack: nn.Sequential) -> dict[str, str]:
    """Layer name -> the module whose output is that layer's features, in order."""
    layers = {}
    for name in dict(stack.named_children()):
        if name.startswith("relu"):
            layers["fc" if name == "relufc" else name.replace("relu", "conv")] = name
        elif name.startswith("pool"):
            layers[name] = name
    return layers


def check_layers(stack: nn.Sequential, arch: str, *names: str) -> None:
    known = list(layer_outputs(stack))
    for name in names:
        if name not in known:
            raise BadInput(f"{name!r} is not a layer of this {arch} encoder: use one of "
                           f"{', '.join(known)}")


def load_encoder(ckpt_uri: str) -> tuple[nn.Sequential, DictConfig, dict]:
    """The plain feature stack of a checkpoint's encoder, its job config and its origin."""
    ckpt = open_store(ckpt_uri)  # its config names an arch cectl knows, or it is refused
    generator, cfg, state = load_generator(ckpt)
    return feature_stack(generator.encoder), cfg, {"checkpoint": ckpt.uri, "step": state["step"]}


def random_encoder(cfg: DictConfig) -> nn.Sequential:
    """The same architecture, freshly initialised (the baseline every paper reports)."""
    from cectl.model import build_models

    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_SEED)
        generator, _ = build_models(OmegaConf.merge(cfg, {"loss": {"mode": "rec"}}))
    return feature_stack(generator.eval().encoder)


# ---- export ---------------------------------------------------------------------------------

def parse_layer_range(stack: nn.Sequential, arch: str, spec: str | None) -> list[str]:
    """The layers of `FIRST..LAST` (or one layer, or all for None), in order."""
    known = list(layer_outputs(stack))
    if spec is None:
        return known
    first, _, last = spec.partition("..")
    last = last or first
    check_layers(stack, arch, first, last)
    if known.index(first) > known.index(last):
        raise BadInput(f"--layers {spec}: {first} comes after {last}")
    return known[known.index(first) : known.index(last) + 1]


def export_encoder(ckpt_uri: str, out: Path, layers: str | None = None) -> dict:
    """Write the encoder's folded weights as safetensors with plain key names; returns metadata."""
    stack, cfg, origin = load_encoder(ckpt_uri)
    chosen = parse_layer_range(stack, cfg.model.arch, layers)
    # A layer's weights are those of the module it is named after (convK, poolK, fc).
    tensors = {key: value.contiguous() for key, value in stack.state_dict().items()
               if key.split(".")[0] in chosen}
    meta = {"format": FORMAT, "arch": cfg.model.arch, "pool_free": str(cfg.model.pool_free),
            "input_size": str(cfg.data.image_size), "normalisation": NORMALISATION,
            "batchnorm": "folded into the preceding layer (running statistics)",
            "layers": ",".join(chosen), "stack": str(stack), **origin,
            "step": str(origin["step"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(save_tensors(tensors, metadata=meta))
    return {**meta, "out": str(out), "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values())}


# ---- features -------------------------------------------------------------------------------

def pooled(x: torch.Tensor) -> torch.Tensor:
    """Per-image feature vectors: conv maps average-pooled to at most PROBE_DIMS values."""
    if x.dim() == 2:
        return x
    grid = min(x.shape[-1], max(1, math.isqrt(PROBE_DIMS // x.shape[1])))
    return F.adaptive_avg_pool2d(x, grid).flatten(1)


def stack_features(stack: nn.Sequential, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled features of every layer, in one forward pass; `images` float in [-1, 1]."""
    wanted = {module: layer for layer, module in layer_outputs(stack).items()}
    features, x = {}, images
    for name, module in stack.named_children():
        x = module(x)
        if name in wanted:
            features[wanted[name]] = pooled(x).float()
    return features


@torch.no_grad()
def shard_features(data_uri: str, shard: str, stacks: dict[str, nn.Sequential],
                   image_size: int) -> dict:
    """Features of every layer of every stack, labels and keys of one shard's samples."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = read_samples(open_store(data_uri), shard)
    labels = [json.loads(s["json"]).get("label") for s in samples]
    if None in labels:
        raise BadInput(f"{shard} in {data_uri} has samples without a label: shard an ImageNet "
                       "layout (wnid folders) or use `cectl shard --label-from folder`")
    chunks: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in stacks}
    for start in range(0, len(samples), BATCH):
        batch = samples[start : start + BATCH]
        images = to_float(to_batch([eval_crop(sample_pixels(s), image_size) for s in batch])
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


# Where shards are processed: given (data_uri, stacks, image_size), a function from shard
# names to (index, shard_features result), in any order.
ShardResults = Callable[[list[str]], Iterator[tuple[int, dict]]]
ResultsFactory = Callable[[str, dict[str, nn.Sequential], int], ShardResults]


def local_results(data_uri: str, stacks: dict[str, nn.Sequential],
                  image_size: int) -> ShardResults:
    """Shards processed one after another in this process."""
    def results(shards: list[str]) -> Iterator[tuple[int, dict]]:
        for index, shard in enumerate(shards):
            yield index, shard_features(data_uri, shard, stacks, image_size)
    return results


def extract_split(data_uri: str, manifest: dict, split: str, stacks: dict[str, nn.Sequential],
                  image_size: int, cache_dir: Path, results: ResultsFactory,
                  console: Console) -> tuple[dict[str, Path], dict]:
    """The cache folder of each stack for `split`, extracting what is not cached yet.

    Each layer is a float16 .npy of (images, dims), rows in manifest order; labels.json,
    written last, marks a folder complete. Returns the folders and the pass's timing."""
    if split not in manifest["splits"]:
        raise BadInput(f"{data_uri} has no {split!r} split: the probe trains on 'train' and "
                       "scores 'val' (shard with --val-fraction)")
    folders = {n: cache_folder(cache_dir, s, manifest, split, image_size)
               for n, s in stacks.items()}
    todo = {n: s for n, s in stacks.items() if not (folders[n] / "labels.json").exists()}
    if not todo:
        return folders, {"images": 0, "seconds": 0.0, "encoders": 0}
    shards = [s for s in manifest["splits"][split]["shards"] if s["samples"]]
    offsets = np.cumsum([0] + [s["samples"] for s in shards])
    partial = {n: folders[n].with_name(folders[n].name + ".partial") for n in todo}
    arrays: dict[str, dict[str, np.ndarray]] = {n: {} for n in todo}
    labels, keys = [None] * offsets[-1], [None] * offsets[-1]
    start = time.perf_counter()
    with make_progress(console) as progress:
        bar = progress.add_task(f"features: {split}", total=int(offsets[-1]))
        for index, result in results(data_uri, todo, image_size)([s["name"] for s in shards]):
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
def ray_results(nodes: int, gpus_per_node: int, cpu: bool,
                address: str | None) -> Iterator[ResultsFactory]:
    """Shards processed as Ray tasks spread over the cluster, one GPU (or CPU) each.

    The cluster is joined and checked as for training. Shards are independent, so plain
    tasks do (no process group); each result goes straight into the driver's cache."""
    from cectl.distributed import join_cluster

    workers, _ = join_cluster((nodes, nodes), gpus_per_node, cpu, address)
    import ray

    try:
        task = ray.remote(shard_features).options(num_cpus=1, num_gpus=0 if cpu else 1,
                                                  scheduling_strategy="SPREAD")

        def factory(data_uri: str, stacks: dict[str, nn.Sequential],
                    image_size: int) -> ShardResults:
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


# ---- linear probe ---------------------------------------------------------------------------

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
              console: Console, results: ResultsFactory = local_results) -> dict:
    """Probe the checkpoint's encoder and a random one, trained on `train`, scored on `val`."""
    model, cfg, origin = load_encoder(ckpt_uri)
    layer = layer or list(layer_outputs(model))[-1]
    check_layers(model, cfg.model.arch, layer)
    stacks = {"model": model, "random": random_encoder(cfg)}
    manifest = open_manifest(data_uri)
    size = cfg.data.image_size
    split_data, timings = {}, []
    for split in ("train", "val"):
        folders, timing = extract_split(data_uri, manifest, split, stacks, size, cache_dir,
                                        results, console)
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
        with console.status(f"training the linear probe on the {name} encoder's {layer}"):
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


# ---- nearest neighbours ---------------------------------------------------------------------

def _context_features(stack: nn.Sequential, cfg: DictConfig, crops: list[np.ndarray],
                      layer: str) -> torch.Tensor:
    """Unit-length features of the context: the central hole filled with the mean (Fig. 8)."""
    images = to_float(to_batch(crops))
    holes = draw_holes("center", len(images), cfg.data.image_size, cfg.mask.overlap, 0)
    with torch.no_grad():
        features = stack_features(stack, fill_holes(images, holes))[layer]
    return F.normalize(features, dim=1)


def find_neighbors(ckpt_uri: str, data_uri: str, queries: list[Path], k: int, split: str,
                   console: Console) -> dict:
    """The k nearest samples of `split` to each query, by the encoder's last layer."""
    stack, cfg, origin = load_encoder(ckpt_uri)
    layer = list(layer_outputs(stack))[-1]
    size = cfg.data.image_size
    crops = []
    for path in queries:
        try:
            crops.append(eval_crop(np.asarray(decode(path.read_bytes()).image), size))
        except Skip as e:
            raise BadInput(f"query {path} cannot be read ({e}): give an image file") from None
    query_features = _context_features(stack, cfg, crops, layer)
    manifest = open_manifest(data_uri)
    if split not in manifest["splits"]:
        raise BadInput(f"{data_uri} has no {split!r} split (it has "
                       f"{', '.join(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    best: list[list[tuple[float, str, np.ndarray]]] = [[] for _ in queries]
    with make_progress(console) as progress:
        bar = progress.add_task(f"neighbours: {split}", total=sum(s["samples"] for s in shards))
        for batch, keys in split_batches(data_uri, split, size, BATCH):
            arrays = list(batch.permute(0, 2, 3, 1).numpy())
            distances = torch.cdist(query_features,
                                    _context_features(stack, cfg, arrays, layer))
            for q, row in enumerate(distances.tolist()):
                candidates = best[q] + list(zip(row, keys, arrays, strict=True))
                best[q] = sorted(candidates, key=lambda c: c[0])[:k]
            progress.advance(bar, len(keys))
    return {**origin, "layer": layer, "split": split, "image_size": size,
            "overlap": cfg.mask.overlap, "crops": crops, "best": best,
            "queries": [{"query": str(path),
                         "neighbors": [{"key": key, "distance": d} for d, key, _ in found]}
                        for path, found in zip(queries, best, strict=True)]}


def neighbor_grid(result: dict) -> Image.Image:
    """One row per query: the query with its hole filled by the mean, then its neighbours."""
    size = result["image_size"]
    rows = [(crop, [a for _, _, a in found]) for crop, found in
            zip(result["crops"], result["best"], strict=True)]
    columns = 1 + max(len(found) for _, found in rows)
    grid = Image.new("RGB", (columns * (size + 4), len(rows) * (size + 4)), "white")
    for r, (crop, found) in enumerate(rows):
        query = to_float(to_batch([crop]))
        holes = draw_holes("center", 1, size, result["overlap"], 0)
        shown = ((fill_holes(query, holes) + 1) * 127.5).round().clamp(0, 255).byte()
        tiles = [shown[0].permute(1, 2, 0).numpy(), *found]
        for c, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (c * (size + 4) + 2, r * (size + 4) + 2))
    return grid
