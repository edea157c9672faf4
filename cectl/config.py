"""One configuration system: OmegaConf structured configs, YAML recipes, KEY=VALUE overrides.

Precedence, lowest first: the dataclass defaults, the recipe file, KEY=VALUE overrides,
then explicit command-line flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cectl.errors import BadInput

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("auto", "imagenet", "paris", "folder")


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
) -> DictConfig:
    """Merge defaults, recipe, overrides and flags into a validated, typed config."""
    layers = [OmegaConf.structured(schema)]
    try:
        if recipe:
            layers.append(OmegaConf.load(find_recipe(recipe, recipe_folder)))
        for item in overrides or []:
            if "=" not in item:
                raise BadInput(f"override {item!r} is not KEY=VALUE")
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        if flags:
            layers.append(OmegaConf.create({k: v for k, v in flags.items() if v is not None}))
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        raise BadInput(f"bad config value: {str(e).splitlines()[0]}") from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, sort_keys=False)
