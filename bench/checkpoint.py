"""Step time of a step that saves a checkpoint, blocking vs background, against one that does not.

dcgan128 with the joint loss (both networks, both Adam states: ~880 MB of safetensors) in
one process, saving to a local folder. Per round and mode, interleaved so that drift hits
both: a plain step, then a step that saves, then `--after` steps while a background
write may still run; each compared with its round's plain step. `blocking` waits for
the write inside the saving step (what cectl did before); `background` is what
`Checkpointer.save` does now (the copy to CPU buffers and the write in a thread; the
next step's optimizer updates wait for the copy). `cycle` is what a save adds to
training in all: the saving step's and the steps after's time over the plain step's.

    .venv/bin/python bench/checkpoint.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from cectl.checkpoint import Checkpointer
from cectl.config import load_config
from cectl.masks import derive_seed, draw_holes
from cectl.model import build_models
from cectl.pixels import to_model_range
from cectl.runs import Run
from cectl.schema import JobConfig
from cectl.storage import open_store
from cectl.train import make_optimizer, train_step


class Position:
    """A loader stand-in: the bench feeds fixed batches."""

    def state_dict(self) -> dict:
        return {"samples": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--after", type=int, default=2, help="steps timed after each save")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(JobConfig, "inpaint-center", ["train.precision=fp32",
                                                     f"data.batch_size={args.batch}"])
    torch.manual_seed(0)
    generator, discriminator = build_models(cfg)
    opt_g = make_optimizer(generator, cfg.optim.lr_d * cfg.optim.lr_ratio, cfg.optim.beta1)
    opt_d = make_optimizer(discriminator, cfg.optim.lr_d, cfg.optim.beta1)
    size = cfg.data.image_size
    images = to_model_range(torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8))
    holes = draw_holes(cfg.mask.kind, args.batch, size, cfg.mask.overlap, derive_seed(0))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpointer = Checkpointer(Run(open_store(tempfile.mkdtemp(prefix="cectl-bench-")), "b"),
                                cfg, {"G": generator, "D": discriminator},
                                {"G": opt_g, "D": opt_d}, Position())

    def step() -> float:
        start = time.perf_counter()
        train_step(generator, discriminator, opt_g, opt_d, images, holes, cfg, scaler)
        return time.perf_counter() - start

    step()  # warm-up: allocations, oneDNN primitives
    # Per round and mode: the plain step's time, the saving step's, and the steps after.
    rounds: dict[str, list[tuple[float, float, list[float]]]] = {"blocking": [],
                                                                  "background": []}
    n = 1
    for _ in range(args.rounds):
        for mode, timed in rounds.items():
            plain = step()
            start = time.perf_counter()
            step()
            checkpointer.save(n, {})
            if mode == "blocking":
                checkpointer.wait()
            saving = time.perf_counter() - start
            timed.append((plain, saving, [step() for _ in range(args.after)]))
            checkpointer.wait()
            n += 1
    # Ratios within a round, against that round's plain step: the load of a shared
    # machine drifts between rounds.
    print(f"| mode (batch {args.batch}) | plain step s | saving step s | saving / plain | "
          f"{args.after} steps after / plain | cycle +s |")
    print("|---|---|---|---|---|---|")
    for mode, timed in rounds.items():
        plain = statistics.median(p for p, _, _ in timed)
        saving = statistics.median(s for _, s, _ in timed)
        ratio = statistics.median(s / p for p, s, _ in timed)
        after = statistics.median(sum(a) / (p * len(a)) for p, _, a in timed)
        cycle = statistics.median(s + sum(a) - p * (1 + len(a)) for p, s, a in timed)
        print(f"| {mode} | {plain:.2f} | {saving:.2f} | {ratio:.2f}x | {after:.2f}x | "
              f"{cycle:+.2f} |")
    print(json.dumps({mode: [(round(p, 3), round(s, 3), [round(x, 3) for x in a])
                             for p, s, a in timed] for mode, timed in rounds.items()}))

if __name__ == "__main__":
    main()
