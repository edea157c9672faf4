"""The training step replayed as one CUDA graph.

dcgan128's step is hundreds of small kernels: launched one by one from Python they cost
the host more time than the GPU needs to run them (on an H100 at batch 64, 9-14 ms a step
whatever the precision, 4.4 ms as a graph: BENCHMARKS.md). Captured once and replayed, a
step costs the host a copy of the batch into the graph's input buffers and one launch.
The step has no host sync and a fixed shape, and fused Adam is capturable, so the graph
is the whole step: forwards, backwards and both optimizer updates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Step = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class GraphedStep:
    """`step(images, holes)` run eagerly `warmup` times (cuDNN picks its kernels, the
    optimizers make their state), then captured and replayed for every batch of the same
    shapes. The losses it returns are overwritten by the next call.

    `before_replay` runs on the host before each replay: hooks on the optimizers run only
    while the step is captured, never on replay."""

    def __init__(self, step: Step, before_replay: Callable[[], None], warmup: int = 3):
        self.step, self.before_replay, self.warmup = step, before_replay, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.losses: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, holes: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.warmup > 0:
            self.warmup -= 1
            return self._on_side_stream(images, holes)
        if self.graph is None:
            self._capture(images, holes)
        elif not all(a.shape == b.shape and a.stride() == b.stride()
                     for a, b in zip(self.inputs, (images, holes), strict=True)):
            return self.step(images, holes)  # not the captured shapes: kernel by kernel
        self.before_replay()
        for buffer, value in zip(self.inputs, (images, holes), strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.losses

    def _on_side_stream(self, images: torch.Tensor, holes: torch.Tensor) -> dict[str, torch.Tensor]:
        # As CUDA graph capture wants it: the warm-up's lazily made state (optimizer
        # moments, cuDNN's choices, autograd's streams) made away from the ambient stream.
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            losses = self.step(images, holes)
        torch.cuda.current_stream(images.device).wait_stream(side)
        return losses

    def _capture(self, images: torch.Tensor, holes: torch.Tensor) -> None:
        self.inputs = (torch.empty_like(images), torch.empty_like(holes))
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread allocates pinned memory meanwhile,
        # which would invalidate a capture that watches every thread.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.losses = self.step(*self.inputs)  # recorded, not run
