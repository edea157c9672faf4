"""The paper's networks: shapes and parameter counts."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cectl.model import ChannelWiseFC, build_models, count_parameters
from cectl.schema import JobConfig


def job(**overrides):
    return OmegaConf.merge(OmegaConf.structured(JobConfig),
                           OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def test_dcgan128_matches_the_reference_sizes():
    generator, discriminator = build_models(job())
    generator.eval()
    discriminator.eval()
    with torch.no_grad():
        assert generator(torch.zeros(2, 3, 128, 128)).shape == (2, 3, 64, 64)
        assert discriminator(torch.zeros(2, 3, 64, 64)).shape == (2,)
    # Encoder 3-64-64-128-256-512 to 4000 units, decoder back: ~71M parameters.
    assert 71_000_000 < count_parameters(generator) < 71_300_000
    bottleneck = [m for m in generator.encoder if isinstance(m, nn.Linear)][0]
    assert bottleneck.weight.shape == (4000, 512 * 4 * 4)
    assert count_parameters(discriminator) == pytest.approx(2_765_633, rel=1e-3)


def test_dcgan128_random_masks_predict_the_whole_image():
    generator, discriminator = build_models(job(**{"mask.kind": "random-region"}))
    with torch.no_grad():
        assert generator.eval()(torch.zeros(1, 3, 128, 128)).shape == (1, 3, 128, 128)
        assert discriminator.eval()(torch.zeros(1, 3, 128, 128)).shape == (1,)
    # train_random.lua: one more 64-channel layer at high resolution in each network.
    assert 71_150_000 < count_parameters(generator) < 71_250_000
    assert count_parameters(discriminator) == pytest.approx(2_831_297, rel=1e-3)


def test_reconstruction_only_builds_no_discriminator():
    _, discriminator = build_models(job(**{"loss.mode": "rec"}))
    assert discriminator is None


@pytest.mark.parametrize("pool_free", [False, True])
def test_alexnet227_encoder_channel_wise_layer_and_output(pool_free):
    cfg = job(**{"model.arch": "alexnet227", "data.image_size": 227, "loss.mode": "rec",
                 "model.pool_free": pool_free})
    generator, _ = build_models(cfg)
    generator.eval()
    x = torch.zeros(2, 3, 227, 227)
    with torch.no_grad():
        assert generator.encoder(x).shape == (2, 256, 6, 6)
        assert generator(x).shape == (2, 3, 113, 113)
    assert any(isinstance(m, nn.MaxPool2d) for m in generator.modules()) != pool_free
    fc = generator.channel_fc
    assert fc.weight.numel() == 256 * 6**4  # m n^4
    assert generator.dropout.p == 0.5
    assert generator.mix.kernel_size == (1, 1) and generator.mix.stride == (1, 1)
    ups = [m for m in generator.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 5


def test_channel_wise_layer_does_not_mix_maps():
    fc = ChannelWiseFC(maps=3, n=4)
    x = torch.randn(1, 3, 4, 4)
    y = fc(x)
    x2 = x.clone()
    x2[:, 1] += 1.0
    y2 = fc(x2)
    assert torch.equal(y[:, 0], y2[:, 0]) and torch.equal(y[:, 2], y2[:, 2])
    assert not torch.equal(y[:, 1], y2[:, 1])
