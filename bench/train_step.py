"""Training-step throughput of dcgan128 with the joint loss at batch 64.

In one process: cectl's step (fp32, which is the default, and bf16 autocast) against a
plain eager-fp32 baseline of the same network and update order (discriminator on real and
fake, then generator on the joint loss): the reference code's layers (a 4x4 conv into the
4000-unit bottleneck and a 4x4 up-conv out of it) and the default Adam. The baseline
starts from cectl's weights, so both compute the same function. Also: peak memory of
each, a per-layer profile, FLOPs per step against this machine's matmul rate, and the
loader's images/s against what the step consumes.

    .venv/bin/python bench/train_step.py              # throughput, profile, loader
    .venv/bin/python bench/train_step.py --curve 200  # also: rec loss over 200 steps
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console
from torch import nn

from cectl.config import load_config
from cectl.data import TrainLoader
from cectl.losses import adversarial_loss, reconstruction_loss
from cectl.masks import derive_seed, draw_holes, fill_holes, loss_weights, output_window
from cectl.model import build_models
from cectl.pixels import to_model_range
from cectl.schema import JobConfig, ShardConfig
from cectl.shard import run_shard
from cectl.shard_format import open_manifest
from cectl.train import make_optimizer, train_step

PARIS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paris-streetview-eval"
BATCH = 64


def reference_layers(generator: nn.Module) -> nn.Module:
    """The same generator with the reference code's conv layers around the bottleneck."""
    ref = copy.deepcopy(generator)
    enc, dec = list(ref.encoder), list(ref.decoder)
    i = next(k for k, m in enumerate(enc) if isinstance(m, nn.Linear))
    linear, bn = enc[i], enc[i + 1]
    conv = nn.Conv2d(linear.in_features // 16, linear.out_features, 4, bias=False)
    conv.weight.data = linear.weight.data.reshape(conv.weight.shape).clone()
    bn2d = nn.BatchNorm2d(bn.num_features)
    bn2d.load_state_dict(bn.state_dict())
    enc[i - 1 : i + 2] = [conv, bn2d]  # Flatten, Linear, BatchNorm1d -> Conv2d, BatchNorm2d
    up_linear, unflatten = dec[0], dec[1]
    channels = unflatten.unflattened_size[0]
    up = nn.ConvTranspose2d(up_linear.in_features, channels, 4, bias=False)
    up.weight.data = up_linear.weight.data.t().reshape(up.weight.shape).clone()
    dec[0:2] = [up]
    ref.encoder, ref.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
    return ref


def baseline_step(g, d, opt_g, opt_d, images, holes, cfg) -> float:
    """The plain loop a researcher would write: eager fp32, default Adam."""
    window = output_window(cfg.data.image_size, cfg.mask.kind)
    target = window.crop(images)
    weights = loss_weights(holes, window, cfg.mask.overlap_weight)
    fake = g(fill_holes(images, holes))
    loss_d = adversarial_loss(d(target), True) + adversarial_loss(d(fake.detach()), False)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    rec = reconstruction_loss(fake, target, weights)
    loss_g = cfg.loss.lambda_rec * rec + cfg.loss.lambda_adv * adversarial_loss(d(fake), True)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return rec.item()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Contender:
    """A network pair, its optimizers and its step function."""

    def __init__(self, name, cfg, generator, discriminator, baseline: bool):
        self.name, self.cfg, self.g, self.d = name, cfg, generator, discriminator
        lr_g, lr_d, beta1 = cfg.optim.lr_d * cfg.optim.lr_ratio, cfg.optim.lr_d, cfg.optim.beta1
        if baseline:
            self.opt_g = torch.optim.Adam(generator.parameters(), lr_g, betas=(beta1, 0.999))
            self.opt_d = torch.optim.Adam(discriminator.parameters(), lr_d, betas=(beta1, 0.999))
        else:
            self.opt_g = make_optimizer(generator, lr_g, beta1)
            self.opt_d = make_optimizer(discriminator, lr_d, beta1)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.baseline = baseline

    def step(self, images, holes) -> float:
        if self.baseline:
            return baseline_step(self.g, self.d, self.opt_g, self.opt_d, images, holes, self.cfg)
        return train_step(self.g, self.d, self.opt_g, self.opt_d, images, holes, self.cfg,
                          self.scaler)["loss_rec"]


def contenders(cfg) -> list[Contender]:
    torch.manual_seed(0)
    g, d = build_models(cfg)
    bf16 = OmegaConf.merge(cfg, {"train": {"precision": "bf16"}})
    return [Contender("baseline eager fp32", cfg, reference_layers(g), copy.deepcopy(d), True),
            Contender("cectl fp32 (default)", cfg, g, d, False),
            Contender("cectl bf16 autocast", bf16, copy.deepcopy(g), copy.deepcopy(d), False)]


_PARIS_128: list[torch.Tensor] = []


def paris_images() -> torch.Tensor:
    """The shared Paris images at 160 px (random 128 crops are drawn from them)."""
    if not _PARIS_128:
        from PIL import Image

        from cectl.pixels import to_batch

        arrays = [np.asarray(Image.open(p).convert("RGB").resize((160, 160), Image.BICUBIC))
                  for p in sorted(PARIS.glob("*.png"))]
        _PARIS_128.append(to_model_range(to_batch(arrays)))
    return _PARIS_128[0]


def batch(step: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s images (random crops of the Paris images, or noise without them)."""
    gen = torch.Generator().manual_seed(step)
    if PARIS.is_dir():
        pool = paris_images()
        pick = torch.randint(0, len(pool), (BATCH,), generator=gen)
        x, y = (int(v) for v in torch.randint(0, 33, (2,), generator=gen))
        images = pool[pick, :, y : y + 128, x : x + 128]
    else:
        images = torch.rand(BATCH, 3, 128, 128, generator=gen) * 2 - 1
    holes = draw_holes(cfg.mask.kind, BATCH, 128, cfg.mask.overlap, derive_seed(0, step))
    return images, holes


def throughput(cs: list[Contender], steps: int) -> dict[str, dict[str, float]]:
    """images/s and peak RSS of each; steps interleaved so that drift hits all alike."""
    seconds, peaks = dict.fromkeys([c.name for c in cs], 0.0), {}
    for c in cs:
        c.step(*batch(0, c.cfg))  # warm-up
    for i in range(steps):
        for c in cs:
            reset_peak_rss()
            start = time.perf_counter()
            c.step(*batch(i + 1, c.cfg))
            seconds[c.name] += time.perf_counter() - start
            peaks[c.name] = max(peaks.get(c.name, 0.0), peak_rss_mb())
    return {c.name: {"images_per_s": BATCH * steps / seconds[c.name],
                     "peak_rss_mb": peaks[c.name]} for c in cs}


def flops_per_step(c: Contender) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        c.step(*batch(0, c.cfg))
    return counter.get_total_flops()


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def layer_profile(c: Contender, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    c.step(*batch(0, c.cfg))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c.step(*batch(1, c.cfg))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def loader_rate(cfg, batches: int = 30) -> float:
    root = Path(tempfile.mkdtemp(prefix="cectl-bench-loader-"))
    run_shard(str(PARIS), str(root / "shards"),
              load_config(ShardConfig, flags={"shard_size": 20, "workers": 2}), Console(quiet=True))
    job = OmegaConf.merge(cfg, {"data": {"uri": str(root / "shards"), "workers": 1}})
    loader = TrainLoader(job.data.uri, open_manifest(job.data.uri), job, 0, 1)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        to_model_range(next(loader)[0])
    return BATCH * batches / (time.perf_counter() - start)


def loss_curves(cfg, steps: int) -> dict[str, list[float]]:
    """Rec loss per step for baseline and cectl fp32 from the same weights and batches."""
    curves = {}
    for c in contenders(cfg)[:2]:
        curves[c.name] = [c.step(*batch(i + 1000, cfg)) for i in range(steps)]
    return curves


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--curve", type=int, default=0, help="also compare rec loss over N steps")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = load_config(JobConfig, "inpaint-center", ["train.precision=fp32"])
    console = Console()
    cs = contenders(cfg)
    x = torch.randn(2, 3, 128, 128)
    cs[0].g.eval(), cs[1].g.eval()
    same = torch.allclose(cs[0].g(x), cs[1].g(x), atol=1e-5)
    cs[0].g.train(), cs[1].g.train()
    console.print(f"baseline and cectl compute the same function: {same}")

    # bf16 is emulated on CPUs without native support (AVX2 here): one step is plenty.
    results = {**throughput(cs[:2], args.steps), **throughput(cs[2:], 1)}
    for name, r in results.items():
        console.print(f"{name:24s} {r['images_per_s']:7.1f} images/s   "
                      f"peak RSS {r['peak_rss_mb']:,.0f} MB")
    base = results["baseline eager fp32"]["images_per_s"]
    for r in results.values():
        r["vs_baseline"] = r["images_per_s"] / base

    flops = flops_per_step(cs[1])
    peak_rate = matmul_gflops()
    achieved = flops * results["cectl fp32 (default)"]["images_per_s"] / BATCH / 1e9
    console.print(f"FLOPs per step {flops / 1e9:.0f} G; cectl fp32 runs at {achieved:.0f} "
                  f"GFLOP/s; this machine's 2048^2 sgemm: {peak_rate:.0f} GFLOP/s "
                  f"({achieved / peak_rate:.0%})")
    console.print(layer_profile(cs[1]), markup=False)
    if PARIS.is_dir():
        rate = loader_rate(cfg)
        step_rate = results["cectl fp32 (default)"]["images_per_s"]
        results["loader_1_worker"] = {"images_per_s": rate, "vs_step": rate / step_rate}
        console.print(f"loader, 1 worker: {rate:.0f} images/s = {rate / step_rate:.1f}x what the "
                      "step consumes")
    if args.curve:
        curves = loss_curves(cfg, args.curve)
        tail = max(1, args.curve // 10)
        for name, values in curves.items():
            console.print(f"{name}: rec loss mean of the last {tail} steps "
                          f"{sum(values[-tail:]) / tail:.5f}")
        diff = [abs(a - b) for a, b in zip(*curves.values(), strict=True)]
        console.print(f"largest per-step difference {max(diff):.2e}")
        results["curves"] = curves
    results.update(flops_per_step=flops, achieved_gflops=achieved, sgemm_gflops=peak_rate)
    json.dump(results, sys.stdout)
    print()


if __name__ == "__main__":
    main()
