"""DDP on this machine: dcgan128 joint-loss steps with 1 and 2 CPU workers (gloo), and
the all-reduce share of a step.

Each worker is a process with its own gloo rank on 127.0.0.1, running cectl's
`train_step` on DDP-wrapped networks at batch 64 per worker (what a Ray Train worker
does, without Ray's start-up). The all-reduce cost is timed on its own: one all-reduce of
a flat float32 buffer as large as all gradients (generator and discriminator).

    .venv/bin/python bench/distributed.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
from train_step import BATCH, batch  # noqa: E402

from cectl.config import load_config  # noqa: E402
from cectl.model import build_models, count_parameters  # noqa: E402
from cectl.schema import JobConfig  # noqa: E402
from cectl.train import make_optimizer, train_step  # noqa: E402


def worker(rank: int, world: int, port: int, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(JobConfig, "inpaint-center", ["train.precision=fp32"])
    torch.manual_seed(0)
    g, d = build_models(cfg)
    opt_g = make_optimizer(g, cfg.optim.lr_d * cfg.optim.lr_ratio, cfg.optim.beta1)
    opt_d = make_optimizer(d, cfg.optim.lr_d, cfg.optim.beta1)
    g_ddp, d_ddp = DistributedDataParallel(g), DistributedDataParallel(d)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(g_ddp, d_ddp, opt_g, opt_d, *batch(rank, cfg), cfg, scaler)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        train_step(g_ddp, d_ddp, opt_g, opt_d, *batch(1000 * rank + i, cfg), cfg, scaler)
    dist.barrier()
    step_s = (time.perf_counter() - start) / steps
    grads = torch.zeros(count_parameters(g) + count_parameters(d))
    dist.all_reduce(grads)
    start = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(grads)
    allreduce_s = (time.perf_counter() - start) / 3
    if rank == 0:
        results[world] = {"step_s": step_s, "images_per_s": world * BATCH / step_s,
                          "allreduce_s": allreduce_s, "grad_mb": grads.numel() * 4 / 1e6}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for world in (1, 2):
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, port, args.steps, results), nprocs=world)
        r = results[world]
        print(f"{world} worker(s): {r['step_s']:.2f} s/step, {r['images_per_s']:.1f} images/s, "
              f"all-reduce of {r['grad_mb']:.0f} MB: {r['allreduce_s']:.2f} s "
              f"({r['allreduce_s'] / r['step_s']:.0%} of a step)")
    print(json.dumps(dict(results)))


if __name__ == "__main__":
    main()
