"""The training step as a CUDA graph: when it is used, and that it changes nothing but speed."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import tiny_job

from cectl.model import build_models
from cectl.monitor import MetricsLogger
from cectl.restore import load_checkpoint
from cectl.storage import open_store
from cectl.train import Session, graphable, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_step_is_a_graph_only_on_one_gpu_without_fp16():
    cfg = tiny_job("unused", "train.precision=bf16")
    gpu = torch.device("cuda")
    assert graphable(cfg, Session(device=gpu))
    assert not graphable(cfg, Session(device=torch.device("cpu")))
    assert not graphable(cfg, Session(device=gpu, world=2))  # DDP launches kernel by kernel
    assert not graphable(tiny_job("unused", "train.precision=fp16"), Session(device=gpu))
    assert not graphable(tiny_job("unused", "train.precision=bf16", "train.cuda_graph=false"),
                         Session(device=gpu))


class SlowToRead:
    """A loss whose value takes `seconds` to read, as a GPU's does while steps are queued."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __float__(self) -> float:
        time.sleep(self.seconds)
        return 1.0


def test_a_log_window_starts_when_the_previous_losses_were_read():
    cfg = tiny_job("unused", "train.log_every=10")
    logger = MetricsLogger(None, cfg, Session(rank=1), start=0)  # rank 1 writes nothing
    logger.log_losses(10, {"loss_rec": SlowToRead(0.5)})
    rate = logger.log_losses(20, {"loss_rec": SlowToRead(0)})["images_per_s"]
    # 10 steps of 8 images right after the slow read: far more than 80 images in 0.5 s
    assert rate > 1000


@needs_cuda
def test_a_graphed_run_ends_with_the_weights_of_an_eager_run(facade_shards, tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    weights = []
    for graph in ("true", "false"):
        cfg = tiny_job(facade_shards, "train.steps=8", "train.checkpoint_every=8",
                       "train.precision=bf16", f"train.cuda_graph={graph}")
        train(cfg, open_store(str(tmp_path)), f"graph-{graph}", Session(device=device))
        tensors, _ = load_checkpoint(str(tmp_path / f"runs/graph-{graph}/checkpoints/step-000008"))
        weights.append(tensors)
    generator, _ = build_models(cfg)
    for name, _ in generator.named_parameters():
        key = f"G.{name}"
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-3, atol=1e-4)


@needs_cuda
def test_every_replay_waits_for_the_checkpoint_copy_first():
    from cectl.graph import GraphedStep

    device = torch.device("cuda", torch.cuda.current_device())
    layer = torch.nn.Linear(4, 1).to(device)
    opt = torch.optim.Adam(layer.parameters(), fused=True, capturable=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        loss = (layer(x) - y).square().mean()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    waits = []
    graphed = GraphedStep(step, before_replay=lambda: waits.append(1), warmup=2)
    x, y = torch.randn(8, 4, device=device), torch.randn(8, 1, device=device)
    losses = [float(graphed(x, y)["loss"]) for _ in range(6)]
    assert len(waits) == 4  # the capture's call and three more replays
    assert losses[-1] < losses[0]  # the replays train
