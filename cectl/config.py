"""One configuration system: OmegaConf structured configs, YAML recipes, KEY=VALUE overrides.

Precedence, lowest first: the dataclass defaults, the recipe file, KEY=VALUE overrides,
then explicit command-line flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cectl.errors import BadInput

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("auto", "imagenet", "paris", "folder")
ARCHS = ("dcgan128", "alexnet227")
MASK_KINDS = ("center", "random-block", "random-region")
LOSS_MODES = ("joint", "rec")
PRECISIONS = ("fp32", "bf16", "fp16")
BATCH_POLICIES = ("per_worker", "global")


@dataclass
class ShardConfig:
    layout: str = "auto"
    resize: int = 350  # shorter side, the reference loadSize; 0 keeps the original bytes
    quality: int = 95
    shard_size: int = 1000
    val_fraction: float = 0.0
    min_size: int = 64
    workers: int = max(1, os.cpu_count() or 1)
    seed: int = 0


@dataclass
class ModelConfig:
    arch: str = "dcgan128"  # dcgan128 (sec. 5.1) | alexnet227 (sec. 3.1 / 5.2)
    bottleneck: int = 4000
    width: int = 64  # channels of the first conv layer (nef/ngf/ndf of the reference code)
    pool_free: bool = False  # alexnet227: strided convs instead of max pooling


@dataclass
class MaskConfig:
    kind: str = "center"  # center | random-block | random-region
    overlap: int = 4  # px of context the prediction also covers
    overlap_weight: float = 10.0  # loss weight there, relative to the hole


@dataclass
class LossConfig:
    mode: str = "joint"  # joint | rec
    lambda_rec: float = 0.999
    lambda_adv: float = 0.001


@dataclass
class OptimConfig:
    lr_d: float = 2e-4
    lr_ratio: float = 10.0  # generator lr / discriminator lr
    beta1: float = 0.5


@dataclass
class DataConfig:
    uri: str = ""  # the shards (local path or s3://); `--data` sets it
    image_size: int = 128  # fineSize
    load_size: int = 350  # loadSize: shorter side before the random crop
    batch_size: int = 64  # per worker, or for all workers with batch_policy=global
    batch_policy: str = "per_worker"  # per_worker | global
    workers: int = 2  # loader processes per training worker


@dataclass
class TrainConfig:
    steps: int = 100_000
    checkpoint_every: int = 1000
    eval_every: int = 500
    log_every: int = 10
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SweepConfig:
    job: str = "inpaint-center"  # the job recipe each trial starts from
    metric: str = "val_l2_pct"  # validation reconstruction error, lower is better
    mode: str = "min"
    samples: int = 16
    grace_steps: int = 1000  # ASHA: no trial is stopped before this step
    reduction_factor: int = 3
    # KEY: uniform(a, b) | loguniform(a, b) | randint(a, b) | choice(a, b, ...)
    space: dict[str, str] = field(default_factory=dict)


def find_recipe(name: str, folder: str) -> Path:
    """A recipe path as given, or a bare name looked up in the repository's `folder/`."""
    for candidate in (Path(name), REPO_ROOT / folder / name, REPO_ROOT / folder / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise BadInput(f"recipe {name!r} not found: give a YAML path or a name from {folder}/")


def load_config(
    schema: type,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    recipe_folder: str = "jobs",
    recipe_text: str | None = None,
) -> DictConfig:
    """Merge defaults, recipe (a file or YAML text), overrides and flags into a typed config."""
    layers = [OmegaConf.structured(schema)]
    try:
        if recipe:
            layers.append(OmegaConf.load(find_recipe(recipe, recipe_folder)))
        if recipe_text is not None:
            layers.append(OmegaConf.create(recipe_text))
        for item in overrides or []:
            if "=" not in item:
                raise BadInput(f"override {item!r} is not KEY=VALUE")
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        if flags:
            layers.append(OmegaConf.create({k: v for k, v in flags.items() if v is not None}))
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        raise BadInput(f"bad config value: {str(e).splitlines()[0]}") from None


def validate_job(cfg: DictConfig) -> DictConfig:
    """Raise BadInput for settings that cannot train; returns cfg."""
    for key, allowed in (("model.arch", ARCHS), ("mask.kind", MASK_KINDS),
                         ("loss.mode", LOSS_MODES), ("train.precision", PRECISIONS),
                         ("data.batch_policy", BATCH_POLICIES)):
        if OmegaConf.select(cfg, key) not in allowed:
            raise BadInput(f"{key}={OmegaConf.select(cfg, key)} is not one of {', '.join(allowed)}")
    for key in ("train.steps", "train.checkpoint_every", "train.eval_every", "train.log_every",
                "data.batch_size", "data.image_size", "model.width", "model.bottleneck"):
        if OmegaConf.select(cfg, key) < 1:
            raise BadInput(f"{key} must be at least 1")
    if cfg.data.workers < 0:
        raise BadInput("data.workers must be 0 (load in the training process) or more")
    size = cfg.data.image_size
    if cfg.model.arch == "alexnet227":
        if size != 227:
            raise BadInput("model.arch=alexnet227 needs data.image_size=227")
        if cfg.loss.mode == "joint":
            raise BadInput("model.arch=alexnet227 trains with loss.mode=rec (sec. 5.2); the "
                           "adversarial loss needs model.arch=dcgan128")
    elif size < 16 or size & (size - 1):
        raise BadInput(f"model.arch=dcgan128 needs data.image_size a power of two >= 16, "
                       f"not {size}")
    if not cfg.data.uri:
        raise BadInput("no training data: give --data URI (a folder or s3:// prefix with a "
                       "manifest.json from `cectl shard`)")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, sort_keys=False)
