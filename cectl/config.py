"""One configuration system: OmegaConf structured configs, YAML recipes, KEY=VALUE overrides.

Precedence, lowest first: the dataclass defaults, the recipe file (or a stored config),
KEY=VALUE overrides, then explicit command-line flags. Every config is loaded through
`load_config`, the one place where it is checked: choices are Enums (OmegaConf refuses
other values on merge) and each dataclass checks its own ranges in `__post_init__`, which
runs when the merged config is built as dataclasses. `${...}` interpolations are refused,
never resolved: configs come from checkpoints and runs that others share, and a resolver
such as `oc.env` would read this machine's secrets.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cectl.errors import BadInput

RECIPES = files("cectl") / "recipes"  # jobs/ and shards/ at the repository top link here
MAX_WIDTH = 512  # model.width: 8x this many channels in the widest layer
MAX_BOTTLENECK = 16384
MAX_IMAGE_SIZE = 1024
MAX_LOAD_SIZE = 4096


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


MaskKind = StrEnum("MaskKind", ["center", "random-block", "random-region"])  # not identifiers


class LossMode(StrEnum):
    joint = "joint"
    rec = "rec"


class Precision(StrEnum):
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
    arch: Arch = Arch.dcgan128
    bottleneck: int = 4000
    width: int = 64  # channels of the first conv layer (nef/ngf/ndf of the reference code)
    pool_free: bool = False  # alexnet227: strided convs instead of max pooling

    def __post_init__(self) -> None:
        _require(1 <= self.width <= MAX_WIDTH, "model.width", f"from 1 to {MAX_WIDTH}")
        _require(1 <= self.bottleneck <= MAX_BOTTLENECK, "model.bottleneck",
                 f"from 1 to {MAX_BOTTLENECK}")


@dataclass
class MaskConfig:
    kind: MaskKind = MaskKind.center
    overlap: int = 4  # px of context the prediction also covers
    overlap_weight: float = 10.0  # loss weight there, relative to the hole

    def __post_init__(self) -> None:
        _require(self.overlap >= 0, "mask.overlap", "0 or more")
        _require(math.isfinite(self.overlap_weight) and self.overlap_weight >= 0,
                 "mask.overlap_weight", "a finite number, 0 or more")


@dataclass
class LossConfig:
    mode: LossMode = LossMode.joint
    lambda_rec: float = 0.999
    lambda_adv: float = 0.001

    def __post_init__(self) -> None:
        for key in ("lambda_rec", "lambda_adv"):
            _require(0 <= getattr(self, key) <= 1, f"loss.{key}", "from 0 to 1")


@dataclass
class OptimConfig:
    lr_d: float = 2e-4
    lr_ratio: float = 10.0  # generator lr / discriminator lr
    beta1: float = 0.5

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
    # per-worker: each worker takes batch_size (the effective batch grows with the workers);
    # global: the workers share batch_size, the effective batch is the recipe's at any scale.
    batch_policy: BatchPolicy = BatchPolicy["per-worker"]
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
    steps: int = 100_000
    checkpoint_every: int = 1000
    eval_every: int = 500
    log_every: int = 10
    seed: int = 0
    precision: Precision = Precision.fp32
    grad_reduce: GradReduce = GradReduce.fp32  # how DDP all-reduces gradients
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


def find_recipe(name: str, folder: str) -> Path:
    """A recipe path as given, or a bare name looked up in the bundled `folder/`."""
    bundled = RECIPES / folder
    for candidate in (Path(name), bundled / name, bundled / f"{name}.yaml"):
        if candidate.is_file():
            return Path(str(candidate))
    raise BadInput(f"recipe {name!r} not found: give a YAML path or a name from {folder}/")


def _interpolations(node: Any, key: str = "") -> list[str]:
    """The keys whose value holds a `${...}` interpolation."""
    if isinstance(node, dict):
        return [k for name, value in node.items()
                for k in _interpolations(value, f"{key}.{name}" if key else str(name))]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _interpolations(value, f"{key}[{i}]")]
    return [key] if isinstance(node, str) and "${" in node else []


def _quiet(message: str) -> str:
    """OmegaConf's first line without the offending value, which may be a secret."""
    return re.sub(r"\b[Vv]alue '.*?'", "value", message.splitlines()[0], flags=re.DOTALL)


def load_config(
    schema: type,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    recipe_folder: str = "jobs",
    stored: str | dict | None = None,
    source: str = "",
) -> DictConfig:
    """Merge defaults, recipe, a stored config (YAML text or a dict from a run or a
    checkpoint, named by `source`), overrides and flags into a checked, typed config."""
    where = f" in {source}" if source else ""
    layers = []
    try:
        if recipe:
            path = find_recipe(recipe, recipe_folder)
            layers.append((str(path), OmegaConf.load(path)))
        if stored is not None:
            if not isinstance(stored, str | dict):
                raise BadInput(f"the config{where} is not a mapping of keys to values")
            layers.append((source or "the stored config", OmegaConf.create(stored)))
        for item in overrides or []:
            if "=" not in item:
                raise BadInput(f"override {item!r} is not KEY=VALUE")
        layers.append(("the KEY=VALUE overrides", OmegaConf.from_dotlist(list(overrides or []))))
        if flags:
            layers.append(("the options", OmegaConf.create(
                {k: v for k, v in flags.items() if v is not None})))
        for name, layer in layers:
            if not isinstance(layer, DictConfig):
                raise BadInput(f"{name} is not a mapping of keys to values")
            if found := _interpolations(OmegaConf.to_container(layer, resolve=False)):
                raise BadInput(f"{found[0]} in {name} is a ${{...}} interpolation: cectl never "
                               "resolves them; write the value itself")
        cfg = OmegaConf.merge(OmegaConf.structured(schema), *(layer for _, layer in layers))
        OmegaConf.to_object(cfg)  # builds the dataclasses: their __post_init__ checks ranges
        return cfg
    except OmegaConfBaseException as e:
        key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise BadInput(f"bad config{where}: {key}{_quiet(str(e))}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"bad config{where}: not valid YAML ({_quiet(str(e))})") from None
    except ValueError as e:
        raise BadInput(f"bad config{where}: {e}") from None


def validate_job(cfg: DictConfig) -> DictConfig:
    """A job config that can train: checked as any loaded config, and with data to train on."""
    cfg = load_config(JobConfig, stored=OmegaConf.to_container(cfg))
    if not cfg.data.uri:
        raise BadInput("no training data: give --data URI (a folder or s3:// prefix with a "
                       "manifest.json from `cectl shard`)")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, sort_keys=False)
