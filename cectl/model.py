"""The networks of the paper.

- `dcgan128` (sec. 5.1, supp. A): DCGAN-like encoder (conv 4x4 stride 2, BN, LeakyReLU
  0.2) down to a bottleneck of `model.bottleneck` units, a decoder of up-convolutions
  (BN, ReLU, tanh) to the output window, and a DCGAN discriminator on that window alone.
- `alexnet227` (sec. 3.1, 5.2, supp. B): AlexNet conv1..pool5 on 227x227 (6x6x256), a
  channel-wise fully connected layer with dropout 0.5, a stride-1 conv across channels,
  five up-convolutions with ReLU.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cectl.errors import BadInput
from cectl.masks import fill_holes, output_window

# Both networks together. The widest config of each cap alone (model.width=512) makes 1.1
# billion; all caps together would make 5 (a 15 GiB generator) from a 1 KB config.
MAX_PARAMETERS = 1_500_000_000


def _log2(size: int, what: str) -> int:
    n = math.log2(size / 4)
    if n != int(n) or n < 2:
        raise ValueError(f"{what} must be 4 x a power of two and at least 16, got {size}")
    return int(n)


def _down_channels(layers: int, base: int, width: int) -> list[int]:
    """Channels of a stride-2 conv stack, as in the reference code.

    The `base` layers that take a half-size window (64 px of 128) down to 4x4 have width,
    2x, 4x, 8x channels (train.lua); each layer beyond them works at a higher resolution
    with `width` channels (train_random.lua's extra 64-channel layer at 128 px).
    """
    extra = layers - base
    return [min(8 * width, width * 2 ** max(0, i - extra)) for i in range(layers)]


class DCGANGenerator(nn.Module):
    """Encoder to a vector of `bottleneck` units, decoder to the `out_size` window."""

    def __init__(self, image_size: int, out_size: int, width: int, bottleneck: int):
        super().__init__()
        layers, ch_in, depth = [], 3, _log2(image_size, "data.image_size")
        for i, ch_out in enumerate(_down_channels(depth, depth - 1, width)):
            layers += [nn.Conv2d(ch_in, ch_out, 4, 2, 1, bias=i == 0)]
            layers += [nn.BatchNorm2d(ch_out)] if i else []
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            ch_in = ch_out
        # The reference code's 4x4 conv over the 4x4 map (and, below, the 4x4 up-conv from
        # 1x1) is one matrix multiply; as nn.Linear it runs 2-5x faster on a CPU
        # (BENCHMARKS.md, training step).
        layers += [nn.Flatten(), nn.Linear(ch_in * 16, bottleneck, bias=False),
                   nn.BatchNorm1d(bottleneck), nn.LeakyReLU(0.2, inplace=True)]
        self.encoder = nn.Sequential(*layers)

        n_up = _log2(out_size, "the output window")
        chs = _down_channels(n_up, depth - 1, width)[::-1]
        layers = [nn.Linear(bottleneck, chs[0] * 16, bias=False), nn.Unflatten(1, (chs[0], 4, 4)),
                  nn.BatchNorm2d(chs[0]), nn.ReLU(inplace=True)]
        for a, b in zip(chs, chs[1:], strict=False):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(chs[-1], 3, 4, 2, 1), nn.Tanh()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DCGANDiscriminator(nn.Module):
    """Real/fake logits for a patch; it never sees the context or the mask."""

    def __init__(self, size: int, image_size: int, width: int):
        super().__init__()
        layers, ch_in = [], 3
        channels = _down_channels(_log2(size, "the discriminator input"),
                                  _log2(image_size, "data.image_size") - 1, width)
        for i, ch_out in enumerate(channels):
            layers += [nn.Conv2d(ch_in, ch_out, 4, 2, 1, bias=i == 0)]
            layers += [nn.BatchNorm2d(ch_out)] if i else []
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            ch_in = ch_out
        layers += [nn.Conv2d(ch_in, 1, 4)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


class ChannelWiseFC(nn.Module):
    """A fully connected layer inside each feature map only: m n^4 weights for m maps of n x n.

    Information flows across all positions of a map but not across maps (the stride-1
    conv that follows mixes channels), far fewer weights than a dense layer (m^2 n^4).
    """

    def __init__(self, maps: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(maps, n * n, n * n) / n)
        self.bias = nn.Parameter(torch.zeros(maps, n * n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, h, w = x.shape
        y = torch.einsum("bmi,mij->bmj", x.reshape(b, m, h * w), self.weight) + self.bias
        return y.reshape(b, m, h, w)


class AlexNetGenerator(nn.Module):
    """AlexNet conv1..pool5 encoder, channel-wise FC, five up-convolutions."""

    def __init__(self, out_size: int, pool_free: bool):
        super().__init__()

        def down(ch: int) -> nn.Module:
            return nn.Conv2d(ch, ch, 3, 2) if pool_free else nn.MaxPool2d(3, 2)

        def conv(a: int, b: int, k: int, stride: int = 1, pad: int = 0) -> list[nn.Module]:
            return [nn.Conv2d(a, b, k, stride, pad), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

        self.encoder = nn.Sequential(
            *conv(3, 96, 11, 4), down(96),  # 227 -> 55 -> 27
            *conv(96, 256, 5, pad=2), down(256),  # 27 -> 13
            *conv(256, 384, 3, pad=1), *conv(384, 384, 3, pad=1),
            *conv(384, 256, 3, pad=1), down(256),  # 13 -> 6
        )
        self.channel_fc = ChannelWiseFC(256, 6)
        self.dropout = nn.Dropout(0.5)
        self.mix = nn.Conv2d(256, 256, 1)
        chs = [256, 128, 64, 64, 32]
        layers = []
        for a, b in zip(chs, chs[1:], strict=False):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(chs[-1], 3, 4, 2, 1), nn.Tanh()]  # 6 -> 192
        self.decoder = nn.Sequential(*layers)
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.dropout(self.channel_fc(self.encoder(x))))
        y = self.decoder(h)
        if y.shape[-1] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear",
                              align_corners=False)
        return y


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(cfg: DictConfig) -> tuple[nn.Module, nn.Module | None]:
    """The generator and, for `loss.mode=joint`, the discriminator (else None). BadInput
    for a config whose networks would hold over MAX_PARAMETERS parameters."""
    with torch.device("meta"):  # shapes alone: nothing allocated
        count = sum(count_parameters(n) for n in _networks(cfg) if n is not None)
    if count > MAX_PARAMETERS:
        raise BadInput(f"model.width={cfg.model.width}, model.bottleneck={cfg.model.bottleneck} "
                       f"and data.image_size={cfg.data.image_size} make networks of "
                       f"{count / 1e9:.1f} billion parameters, over the "
                       f"{MAX_PARAMETERS / 1e9:.1f} billion cectl builds: lower them")
    generator, discriminator = _networks(cfg)
    generator.apply(_init_weights)
    if discriminator is not None:
        discriminator.apply(_init_weights)
    return generator, discriminator


def _networks(cfg: DictConfig) -> tuple[nn.Module, nn.Module | None]:
    window = output_window(cfg.data.image_size, cfg.mask.kind)
    if cfg.model.arch == "dcgan128":
        generator = DCGANGenerator(cfg.data.image_size, window.size, cfg.model.width,
                                   cfg.model.bottleneck)
    else:
        generator = AlexNetGenerator(window.size, cfg.model.pool_free)
    if cfg.loss.mode != "joint":
        return generator, None
    return generator, DCGANDiscriminator(window.size, cfg.data.image_size, cfg.model.width)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weights_digest(*modules: nn.Module) -> str:
    """A hash of the modules' parameters: equal on DDP ranks that stayed in step.

    BatchNorm's running statistics are left out: each rank updates its own in every
    forward, after DDP has broadcast rank 0's.
    """
    digest = hashlib.sha256()
    for module in modules:
        for param in module.parameters():
            digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def complete(generator: nn.Module, images: torch.Tensor, holes: torch.Tensor,
             window_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction of the output window, images with the holes filled by it), in [-1, 1]."""
    pred = generator(fill_holes(images, holes)).float()
    size = pred.shape[-1]
    canvas = images.clone()
    canvas[..., window_offset : window_offset + size, window_offset : window_offset + size] = pred
    return pred, torch.where(holes, canvas, images)
