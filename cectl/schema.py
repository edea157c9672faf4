"""The config schema: every key of a job, a shard recipe and a sweep, with its default
and its allowed values. Choices are Enums (OmegaConf refuses other values on merge) and
each dataclass checks its own ranges in `__post_init__`. `cectl.config` loads and merges
configs against these; docs/train.md's key table is generated from them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import StrEnum

MAX_WIDTH = 512  # model.width: 8x this many channels in the widest layer
MAX_BOTTLENECK = 16384
MAX_IMAGE_SIZE = 1024
MAX_LOAD_SIZE = 4096
MIN_AREA, MAX_AREA, AREA_SPAN = 0.01, 0.9, 0.05  # free-form holes' areas, and their range


class Layout(StrEnum):
    auto = "auto"
    imagenet = "imagenet"
    paris = "paris"
    folder = "folder"


class LabelSource(StrEnum):
    layout = "layout"  # what the layout knows: the ImageNet wnid
    folder = "folder"  # the top-level folder under SRC (folder layout)


class Arch(StrEnum):
    dcgan128 = "dcgan128"  # sec. 5.1
    alexnet227 = "alexnet227"  # sec. 3.1 / 5.2


MaskKind = StrEnum("MaskKind", ["center", "random-block", "random-region", "free-form",
                               "files"])  # not identifiers


class LossMode(StrEnum):
    joint = "joint"
    rec = "rec"


class Precision(StrEnum):
    auto = "auto"  # bf16 where the device computes in bf16 natively, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class GradReduce(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"  # a DDP comm hook: NCCL only


class Decoder(StrEnum):
    auto = "auto"  # gpu on a CUDA device with torchvision installed, else cpu
    cpu = "cpu"
    gpu = "gpu"  # nvJPEG through torchvision (the `gpu` extra)


BatchPolicy = StrEnum("BatchPolicy", ["per-worker", "global"])  # not identifiers


class SweepMode(StrEnum):
    min = "min"
    max = "max"


MASK_KINDS = tuple(MaskKind)


def _require(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {rule}")


def _rate(value: float) -> bool:
    return math.isfinite(value) and value > 0


def is_count(value: object) -> bool:
    """Whether a value read from JSON is a whole number of things: an int (not a bool) >= 0."""
    return type(value) is int and value >= 0


@dataclass
class ShardConfig:
    layout: Layout = Layout.auto
    resize: int = 350  # shorter side, the reference loadSize; 0 keeps the original bytes
    quality: int = 95
    shard_size: int = 1000
    val_fraction: float = 0.0
    min_size: int = 64
    workers: int = max(1, os.cpu_count() or 1)
    seed: int = 0
    label_from: LabelSource = LabelSource.layout

    def __post_init__(self) -> None:
        _require(self.resize >= 0, "resize", "0 (keep the bytes) or more")
        _require(1 <= self.quality <= 100, "quality", "from 1 to 100")
        for key in ("shard_size", "min_size", "workers"):
            _require(getattr(self, key) >= 1, key, "at least 1")
        _require(0 <= self.val_fraction < 1, "val_fraction", "at least 0 and below 1")


@dataclass
class ModelConfig:
    arch: Arch = Arch.dcgan128  # dcgan128: inpainting (sec. 5.1); alexnet227: features (5.2)
    bottleneck: int = 4000  # units between encoder and decoder (dcgan128)
    width: int = 64  # channels of the first conv layer (nef/ngf/ndf of the reference code)
    pool_free: bool = False  # alexnet227: strided convs instead of max pooling

    def __post_init__(self) -> None:
        _require(1 <= self.width <= MAX_WIDTH, "model.width", f"from 1 to {MAX_WIDTH}")
        _require(1 <= self.bottleneck <= MAX_BOTTLENECK, "model.bottleneck",
                 f"from 1 to {MAX_BOTTLENECK}")


@dataclass
class MaskConfig:
    kind: MaskKind = MaskKind.center  # the hole: center, blocks, regions, brush strokes, mask files
    overlap: int = 4  # px of context the prediction also covers
    overlap_weight: float = 10.0  # loss weight there, relative to the hole
    min_area: float = 0.1  # free-form: the least fraction of the image the strokes cover
    max_area: float = 0.4  # free-form: the most
    source: str = ""  # files: the mask images, a folder or shards (local path or s3://)

    def __post_init__(self) -> None:
        _require(self.overlap >= 0, "mask.overlap", "0 or more")
        _require(math.isfinite(self.overlap_weight) and self.overlap_weight >= 0,
                 "mask.overlap_weight", "a finite number, 0 or more")
        _require(MIN_AREA <= self.min_area <= round(MAX_AREA - AREA_SPAN, 9), "mask.min_area",
                 f"from {MIN_AREA:g} to {MAX_AREA - AREA_SPAN:g}")
        # A segment of a stroke adds a few percent of the image at once: a narrower range
        # would make most holes jump over it.
        _require(round(self.max_area - self.min_area, 9) >= AREA_SPAN
                 and self.max_area <= MAX_AREA, "mask.max_area",
                 f"at most {MAX_AREA:g} and at least mask.min_area + {AREA_SPAN:g}")
        _require(self.kind != MaskKind.files or bool(self.source), "mask.source",
                 "set with mask.kind=files (a folder of mask images or shards of them)")


@dataclass
class LossConfig:
    mode: LossMode = LossMode.joint  # joint: reconstruction + adversarial; rec: L2 alone
    lambda_rec: float = 0.999  # weight of the reconstruction loss (joint)
    lambda_adv: float = 0.001  # weight of the adversarial loss (joint)

    def __post_init__(self) -> None:
        for key in ("lambda_rec", "lambda_adv"):
            _require(0 <= getattr(self, key) <= 1, f"loss.{key}", "from 0 to 1")


@dataclass
class OptimConfig:
    lr_d: float = 2e-4  # discriminator learning rate (Adam)
    lr_ratio: float = 10.0  # generator lr / discriminator lr
    beta1: float = 0.5  # Adam beta1

    def __post_init__(self) -> None:
        for key in ("lr_d", "lr_ratio"):
            _require(_rate(getattr(self, key)), f"optim.{key}", "a finite number above 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", "at least 0 and below 1")


@dataclass
class DataConfig:
    uri: str = ""  # the shards (local path or s3://); `--data` sets it
    image_size: int = 128  # fineSize
    load_size: int = 350  # loadSize: shorter side before the random crop
    batch_size: int = 64  # per worker, or for all workers together (batch_policy)
    # per-worker: the effective batch grows with the workers; global: it stays the recipe's.
    batch_policy: BatchPolicy = BatchPolicy["per-worker"]  # each takes batch_size, or all share it
    workers: int = 2  # loader processes per training worker
    decode: Decoder = Decoder.auto  # where JPEGs are decoded

    def __post_init__(self) -> None:
        _require(16 <= self.image_size <= MAX_IMAGE_SIZE, "data.image_size",
                 f"from 16 to {MAX_IMAGE_SIZE}")
        _require(1 <= self.load_size <= MAX_LOAD_SIZE, "data.load_size",
                 f"from 1 to {MAX_LOAD_SIZE}")
        _require(self.batch_size >= 1, "data.batch_size", "at least 1")
        _require(self.workers >= 0, "data.workers", "0 (load in the training process) or more")


@dataclass
class TrainConfig:
    steps: int = 100_000  # optimizer steps (each updates D, then G)
    checkpoint_every: int = 1000  # steps between checkpoints (and at the last step)
    eval_every: int = 500  # steps between validations (sample grid, val metrics, best)
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 0  # weights, data order, crops and holes
    precision: Precision = Precision.auto  # autocast dtype; auto: bf16 where native, else fp32
    grad_reduce: GradReduce = GradReduce.fp32  # how DDP all-reduces gradients
    cuda_graph: bool = True  # one GPU: replay the step as one CUDA graph (not with fp16)
    resize_check_s: float = 30.0  # `--nodes MIN:MAX`: how often a group looks for more nodes

    def __post_init__(self) -> None:
        for key in ("steps", "checkpoint_every", "eval_every", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}", "at least 1")
        _require(_rate(self.resize_check_s), "train.resize_check_s", "a finite number above 0")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        size = self.data.image_size
        if self.model.arch == Arch.alexnet227:
            if size != 227:
                raise ValueError("model.arch=alexnet227 needs data.image_size=227")
            if self.loss.mode == LossMode.joint:
                raise ValueError("model.arch=alexnet227 trains with loss.mode=rec (sec. 5.2); "
                                 "the adversarial loss needs model.arch=dcgan128")
        elif size & (size - 1):
            raise ValueError(f"model.arch=dcgan128 needs data.image_size a power of two, "
                             f"not {size}")
        # A hole spans about half the image's side (the central square; random masks cover
        # about a quarter of the area); an overlap of half of that leaves no hole.
        hole = size // 2
        _require(2 * self.mask.overlap < hole, "mask.overlap",
                 f"below {hole / 2:g} px for {size} px images")


@dataclass
class SweepConfig:
    job: str = "inpaint-center"  # the job recipe each trial starts from
    metric: str = "val_l2_pct"  # validation reconstruction error, lower is better
    mode: SweepMode = SweepMode.min
    samples: int = 16
    grace_steps: int = 1000  # ASHA: no trial is stopped before this step
    reduction_factor: int = 3
    # KEY: uniform(a, b) | loguniform(a, b) | randint(a, b) | choice(a, b, ...)
    space: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("samples", "grace_steps"):
            _require(getattr(self, key) >= 1, key, "at least 1")
        _require(self.reduction_factor >= 2, "reduction_factor", "at least 2")
