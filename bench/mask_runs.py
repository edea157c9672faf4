"""Whole `cectl train --local` runs on a CPU: what random-region holes cost a run.

A center-hole network predicts the central window and its discriminator sees that
window; a network for any other hole predicts the whole image (train_random.lua), with
one more layer at full resolution and a discriminator that sees 4x the pixels. So a
random-region run against a center one compares two networks as much as two holes. The
third run here has center holes on the random-region network: `mask.kind=files` with a
set of one mask, the center hole (a user's own mask set trains that network), whose holes
cost the loader processes a few bit operations.

Runs: the tiniest dcgan128 (`model.width=2 model.bottleneck=32`) at 128 px, batch 64,
fp32, 2 loader processes with CPU decoding, on generated 467x350 JPEG shards; images/s
over the log windows of the second half of `--steps`, the three runs in turn for
`--rounds`. Printed as one JSON line with the ratios (the median over the rounds of each
round's ratio: a round's runs are close in time, so they share the machine's load):

- `region_over_center_holes`: random-region against center holes on the same network
  (what the holes cost a run);
- `region_over_center_network`: random-region against the center-hole network.

    .venv/bin/python bench/mask_runs.py [--steps 60] [--rounds 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cectl, without PYTHONPATH

import torch  # noqa: E402
from feed import emit, make_shards  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from PIL import Image  # noqa: E402

from cectl.config import load_config, validate_job  # noqa: E402
from cectl.masks import draw_holes  # noqa: E402
from cectl.schema import JobConfig, MaskConfig  # noqa: E402
from cectl.storage import open_store  # noqa: E402
from cectl.train import Session, train  # noqa: E402

SIZE = 128
RUNS = {  # name: overrides
    "center": ["mask.kind=center"],
    "center_holes_whole_image_network": ["mask.kind=files"],
    "random_region": ["mask.kind=random-region"],
}


def center_mask_set(root: Path) -> str:
    """A mask set of one mask: the center hole, as `mask.kind=center` draws it."""
    folder = root / "center-mask"
    folder.mkdir()
    hole = draw_holes("center", 1, SIZE, MaskConfig.overlap, 0)[0, 0]
    Image.fromarray(hole.numpy().astype("uint8") * 255).save(folder / "center.png")
    return str(folder)


def run(shards: str, masks: str, overrides: list[str], steps: int) -> float:
    cfg = validate_job(load_config(JobConfig, "inpaint-center", [
        "model.width=2", "model.bottleneck=32", "data.batch_size=64", "data.workers=2",
        "data.decode=cpu", "train.precision=fp32", f"train.steps={steps}",
        "train.log_every=10", "train.eval_every=100000", "train.checkpoint_every=100000",
        *overrides], {"data": {"uri": shards}, "mask": {"source": masks}}))
    return run_rate(cfg, torch.device("cpu"))


def run_rate(cfg: DictConfig, device: torch.device) -> float:
    """images/s of `cectl train --local` over the log windows of the run's second half."""
    rates = []

    def keep(step: int, metrics: dict) -> None:
        if step > cfg.train.steps // 2 and "images_per_s" in metrics:
            rates.append(metrics["images_per_s"])

    with tempfile.TemporaryDirectory(prefix="cectl-bench-runs-store-") as store:
        train(cfg, open_store(store), "bench", Session(device=device, on_log=keep))
    return len(rates) / sum(1 / r for r in rates)  # windows of as many images each


def median_ratio(runs: list[float], baselines: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(runs, baselines, strict=True)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cectl-bench-runs-") as root:
        shards, masks = make_shards(Path(root), args.images), center_mask_set(Path(root))
        rates: dict[str, list[float]] = {name: [] for name in RUNS}
        for round_ in range(args.rounds):
            for name, overrides in RUNS.items():
                rates[name].append(round(run(shards, masks, overrides, args.steps), 1))
            print(f"round {round_ + 1}: {json.dumps(rates)}", file=sys.stderr, flush=True)
    report = {"images_per_s": rates,
              "region_over_center_holes": median_ratio(
                  rates["random_region"], rates["center_holes_whole_image_network"]),
              "region_over_center_network": median_ratio(rates["random_region"],
                                                         rates["center"])}
    emit(report, args.json)


if __name__ == "__main__":
    main()
