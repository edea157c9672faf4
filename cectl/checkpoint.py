"""Checkpoints and runs on storage.

STORE/runs/RUN/config.yaml, metrics.jsonl, samples/step-NNNNNN.png and
checkpoints/step-NNNNNN/{model.safetensors,state.json}. Tensors (both networks, both
optimizers, the RNG) go in safetensors; everything else in JSON. state.json is written
last, so a checkpoint without it is incomplete and ignored. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from cectl.config import JobConfig
from cectl.errors import BadInput
from cectl.storage import Store, open_store

FORMAT = "cectl-checkpoint/1"
STEP_DIR = re.compile(r"checkpoints/step-(\d+)/state\.json$")
KEEP_LAST = 3  # older checkpoints are deleted, except the best one


def step_dir(step: int) -> str:
    return f"checkpoints/step-{step:06d}"


def collect_tensors(modules: dict[str, nn.Module | None],
                    optimizers: dict[str, torch.optim.Optimizer | None]) -> dict[str, torch.Tensor]:
    """Flat name -> tensor for networks, optimizer states and the torch RNG."""
    tensors = {}
    for name, module in modules.items():
        if module is not None:
            for key, value in module.state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    for name, opt in optimizers.items():
        if opt is not None:
            for index, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    tensors[f"optim.{name}.{index}.{key}"] = torch.as_tensor(value).cpu().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def load_generator(uri: str | Store) -> tuple[nn.Module, DictConfig, dict]:
    """The generator of a checkpoint (eval mode, CPU), its job config and its state."""
    from cectl.model import build_models

    tensors, state = load_checkpoint(uri)
    cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), state["config"])
    generator, _ = build_models(OmegaConf.merge(cfg, {"loss": {"mode": "rec"}}))
    try:
        restore_tensors(tensors, {"G": generator}, {})
    except RuntimeError:
        raise BadInput(f"{state.get('checkpoint', 'the checkpoint')} does not match the "
                       f"{cfg.model.arch} network it claims to hold") from None
    return generator.eval(), cfg, state


def restore_tensors(tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module | None],
                    optimizers: dict[str, torch.optim.Optimizer | None]) -> None:
    """Load networks and optimizer states; the RNG is the caller's to restore, when due."""
    for name, module in modules.items():
        if module is not None:
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                    if k.startswith(prefix)})
    for name, opt in optimizers.items():
        if opt is None:
            continue
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Run:
    """One training run's folder in a store."""

    def __init__(self, store: Store, name: str):
        self.name, self.store = name, store.child(f"runs/{name}")

    def exists(self) -> bool:
        return bool(self.store.list())

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(m.group(1)) for key in self.store.list("checkpoints/")
                      if (m := STEP_DIR.match(key)))

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> str:
        folder = step_dir(step)
        self.store.write_bytes(f"{folder}/model.safetensors", save_tensors(tensors))
        self.store.write_bytes(f"{folder}/state.json",
                               json.dumps({"format": FORMAT, **state}, indent=2).encode())
        self._prune(keep=state.get("best_step"))
        return self.store.url(folder)

    def _prune(self, keep: int | None) -> None:
        for step in self.steps()[:-KEEP_LAST]:
            if step != keep:
                for key in self.store.list(f"{step_dir(step)}/"):
                    self.store.delete(key)

    def checkpoint(self, which: str = "latest") -> Store:
        """The store of a checkpoint: latest, best or a step number."""
        steps = self.steps()
        if not steps:
            raise BadInput(f"run {self.name!r} has no checkpoint in {self.store.uri}")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            state = read_state(self.store.child(step_dir(steps[-1])))
            step = state.get("best_step") or steps[-1]
        elif which.isdigit() and int(which) in steps:
            step = int(which)
        else:
            raise BadInput(f"run {self.name!r} has no checkpoint {which!r}; it has steps "
                           f"{', '.join(map(str, steps))}, latest and best")
        return self.store.child(step_dir(step))


def read_state(ckpt: Store) -> dict:
    try:
        state = json.loads(ckpt.read_bytes("state.json"))
    except FileNotFoundError:
        raise BadInput(f"{ckpt.uri} is not a checkpoint: state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{ckpt.url('state.json')} is corrupt") from None
    if state.get("format") != FORMAT:
        raise BadInput(f"{ckpt.uri} is not a cectl checkpoint")
    return state


def load_checkpoint(uri: str | Store) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, local or on S3."""
    ckpt = open_store(uri) if isinstance(uri, str) else uri
    state = read_state(ckpt)
    try:
        tensors = load_tensors(ckpt.read_bytes("model.safetensors"))
    except FileNotFoundError:
        raise BadInput(f"{ckpt.uri} is missing model.safetensors") from None
    except SafetensorError:
        raise BadInput(f"{ckpt.url('model.safetensors')} is corrupt") from None
    return tensors, state


def list_runs(store: Store) -> list[str]:
    return sorted({key.split("/")[1] for key in store.list("runs/") if key.count("/") >= 2})

