"""One configuration system: OmegaConf structured configs, YAML recipes, KEY=VALUE overrides.

Precedence, lowest first: the dataclass defaults (`cectl.schema`), the recipe file (or a
stored config), KEY=VALUE overrides, then explicit command-line flags. Every config is
loaded through `load_config`, the one place where it is checked: against the schema's
Enums on merge, and by each dataclass's `__post_init__` when the merged config is built.
`${...}` interpolations are refused, never resolved: configs come from checkpoints and
runs that others share, and a resolver such as `oc.env` would read this machine's secrets.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cectl.errors import BadInput
from cectl.schema import JobConfig

RECIPES = files("cectl") / "recipes"  # jobs/ and shards/ at the repository top link here
def find_recipe(name: str, folder: str) -> Path:
    """A recipe path as given, else a bundled one: `NAME`, `NAME.yaml` or `FOLDER/NAME.yaml`
    (the repository's `jobs/` and `shards/` link to the bundled folders), from any directory."""
    bundled = RECIPES / folder
    bare = name.removeprefix(f"{folder}/")
    for candidate in (Path(name), bundled / bare, bundled / f"{bare}.yaml"):
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
    except RecursionError:  # nested far deeper than any config: a damaged or hostile file
        raise BadInput(f"bad config{where}: nested too deeply") from None


def validate_job(cfg: DictConfig) -> DictConfig:
    """A job config that can train: checked as any loaded config, and with data to train on."""
    cfg = load_config(JobConfig, stored=OmegaConf.to_container(cfg))
    if not cfg.data.uri:
        raise BadInput("no training data: give --data URI (a folder or s3:// prefix with a "
                       "manifest.json from `cectl shard`)")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, sort_keys=False)
