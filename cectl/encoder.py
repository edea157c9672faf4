"""Feature learning (sec. 5.2, Fig. 8): a checkpoint's encoder as a plain feature stack.

A checkpoint's encoder becomes a plain feature stack: named Conv2d / ReLU (LeakyReLU 0.2
for dcgan128) / MaxPool2d / Flatten / Linear modules, every BatchNorm folded into the
layer before it with its running statistics, so a torch.nn stack of the same shape,
without BN, computes the same features. `cectl export` writes that stack; `cectl probe`
and `cectl neighbors` compute features with it.

Layers: alexnet227 conv1 pool1 conv2 pool2 conv3 conv4 conv5 pool5 (with
`model.pool_free`, poolK is a stride-2 conv); dcgan128 conv1 .. convN and fc (the
bottleneck). A conv layer's features are taken after its activation.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from cectl.errors import BadInput
from cectl.restore import load_generator
from cectl.storage import open_store

# Conv features are average-pooled to at most this many values per image: pool5's
# 6x6x256, the size linear-probe protocols use for every layer.
PROBE_DIMS = 9216
RANDOM_SEED = 0  # of the random-encoder baseline
BATCH = 64


def _fold(layer: nn.Conv2d | nn.Linear, bn: nn.Module | None) -> nn.Module:
    """A copy of `layer`, with a bias, that computes `bn(layer(x))` in eval mode."""
    if bn is not None:
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        return fuse(layer.eval(), bn.eval())
    plain = copy.deepcopy(layer)
    if plain.bias is None:
        plain.bias = nn.Parameter(torch.zeros(plain.weight.shape[0]))
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
