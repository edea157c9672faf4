"""`cectl train --nodes N`: the same training loop on Ray Train workers, DDP across nodes.

Ray Train (V2) starts N x G workers, one GPU each (or CPU workers with gloo for `--cpu`),
spread over the nodes. Each worker runs `cectl.train.train` with its rank: it takes its
share of each global batch, wraps both networks in DDP, and only rank 0 writes model
files. When a worker dies, Ray restarts the worker group (FailureConfig) and the loop
resumes from the latest checkpoint in the store, data position included. With
`--nodes MIN:MAX` the group is elastic: Ray starts it with as many workers as the cluster
holds (at least MIN x G, at most MAX x G), restarts it smaller when a node is lost and
larger when nodes come back (looked for every `train.resize_check_s` seconds); each
restart resumes from the latest checkpoint, and as the data position counts samples for
the whole job, the new group goes on with the same epoch. BatchNorm: each worker normalises with its
own batch's statistics (SyncBatchNorm would add two all-reduces per layer; with
`data.batch_policy=global` over many workers the shares get small, and so do those
statistics); DDP broadcasts rank 0's running statistics before every forward, and rank
0's are the ones a checkpoint holds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from cectl.cluster import join_cluster
from cectl.errors import BadInput, Failure
from cectl.render import TrainProgress
from cectl.runs import Run
from cectl.storage import Store, open_store
from cectl.train import Session, describe_batch, train

MAX_FAILURES = 3
# Ray Train waits this long for a new group's resources before it looks again. An elastic
# group is sized to resources Ray saw a moment ago, so after a node's death they may be
# gone: look again soon, not after Ray's default 60 s. (Ray Train hands the driver's value
# to its controller.)
ELASTIC_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")


def ddp_wrapper(device: torch.device, grad_reduce: str,
                world: int) -> Callable[[nn.Module], nn.Module]:
    """DDP for a network already on `device`; `grad_reduce=bf16` halves the all-reduce
    traffic (gradients sent as bf16, averaged, then cast back: NCCL only). A world of one
    has nothing to reduce: its networks stay as they are (and its step can be a CUDA
    graph), as in `--local`."""
    if world == 1:
        return lambda module: module
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        ddp = DistributedDataParallel(module,
                                      device_ids=[device] if device.type == "cuda" else None)
        if grad_reduce == "bf16":
            ddp.register_comm_hook(None, bf16_compress_hook)
        return ddp

    return wrap


def _worker(config: dict) -> None:
    """One Ray Train worker: the training loop with this worker's rank."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    cfg = OmegaConf.create(config["cfg"])
    queue = config["progress"]

    def on_log(step: int, metrics: dict) -> None:
        queue.put_nowait((step, metrics))

    def on_checkpoint(step: int, metrics: dict) -> None:
        ray.train.report({"step": step, **metrics})

    device = ray.train.torch.get_device()
    world = context.get_world_size()
    session = Session(
        rank=rank, world=world, device=device,
        wrap=ddp_wrapper(device, cfg.train.grad_reduce, world),
        on_log=on_log if rank == 0 else None, on_checkpoint=on_checkpoint)
    # A restarted worker group finds the checkpoints of the attempt before it. The driver
    # holds the run: rank 0 writes under its claim, wherever Ray places it.
    train(cfg, open_store(config["store"]), config["name"], session, resume=True,
          claim=config["claim"])


def parse_nodes(text: str) -> tuple[int, int]:
    """`--nodes N` or `--nodes MIN:MAX` as (min, max)."""
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise BadInput(f"--nodes {text}: give a number of nodes N or bounds MIN:MAX") from None


def train_on_ray(cfg: DictConfig, store: Store, name: str, nodes: tuple[int, int],
                 gpus_per_node: int, cpu: bool, address: str | None, resume: bool,
                 console: Console) -> dict:
    """Run the job on N x G Ray Train workers, N within `nodes` (min, max); returns the
    run's summary."""
    low, high = nodes
    if cpu and cfg.train.grad_reduce == "bf16":
        raise BadInput("train.grad_reduce=bf16 is a comm hook for NCCL: GPU workers only "
                       "(drop --cpu, or use train.grad_reduce=fp32)")
    if high > low:
        os.environ.setdefault(*ELASTIC_START_TIMEOUT)
    workers, most = join_cluster(nodes, gpus_per_node, cpu, address)
    import ray

    try:
        # The driver holds the run for the whole Ray run, through every restart of the
        # worker group: a claim taken by rank 0 would be refused to the next rank 0 on
        # another host.
        run = Run(store, name)
        claim = run.claim(resume)
        try:
            return _fit(cfg, run, claim.record, (workers, most), nodes, cpu, console)
        finally:
            claim.release()
    finally:
        ray.shutdown()


def _fit(cfg: DictConfig, run: Run, claim: dict, sizes: tuple[int, int],
         nodes: tuple[int, int], cpu: bool, console: Console) -> dict:
    """The Ray Train run on the joined cluster, `sizes` the (fewest, most) workers, all
    writing under the driver's `claim`; the run's summary."""
    (workers, most), (low, high) = sizes, nodes
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store, name = run.root, run.name
    fs, root = store.arrow_fs()
    # On the driver's node: the queue must outlive any worker node that is lost.
    progress_queue = Queue(actor_options={
        "num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)})
    kind = "CPU" if cpu else "GPU"
    if most == workers:
        console.print(f"{workers} {kind} workers on {low} node(s), "
                      f"{describe_batch(cfg, workers)}")
    else:
        console.print(f"{workers} to {most} {kind} workers on {low} to {high} nodes "
                      f"(elastic), {describe_batch(cfg, workers)} to "
                      f"{describe_batch(cfg, most)}")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg), "store": store.uri,
                           "name": name, "claim": claim, "progress": progress_queue},
        torch_config=TorchConfig(backend="gloo" if cpu else "nccl"),
        scaling_config=ScalingConfig(
            num_workers=workers if most == workers else (workers, most), use_gpu=not cpu,
            resources_per_worker={"CPU": 1} if cpu else {"GPU": 1},
            placement_strategy="SPREAD" if high > 1 else "PACK",
            elastic_resize_monitor_interval_s=cfg.train.resize_check_s),
        run_config=RunConfig(name=name, storage_path=f"{root}/ray", storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)),
    )
    done = threading.Event()
    with TrainProgress(console, cfg.train.steps) as progress:

        def pump() -> None:
            while not done.is_set():
                try:
                    progress.update(*progress_queue.get(timeout=0.5))
                except Empty:
                    continue

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            run.check_claim()  # lost: that is why, and the sentence to say
            raise Failure(f"training failed after {MAX_FAILURES} restarts: "
                          f"{str(e).strip().splitlines()[-1]}") from None
        finally:
            done.set()
            thread.join()
    return run.summary()
