"""Checkpoints and runs on storage.

STORE/runs/RUN/config.yaml, metrics.jsonl, samples/step-NNNNNN.png and
checkpoints/step-NNNNNN/{model.safetensors,state.json}; claim.json while a process trains
the run (created atomically, so a second training of it is refused). Tensors (both
networks, both optimizers, the RNG) go in safetensors; everything else in JSON. state.json
is written last, so a checkpoint without it is incomplete and ignored. Nothing is ever
unpickled, and state.json is checked as data (its config like any loaded config).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from cectl.config import JobConfig, load_config
from cectl.errors import BadInput
from cectl.storage import Store, check_name, open_store

FORMAT = "cectl-checkpoint/1"
STEP_DIR = re.compile(r"checkpoints/step-(\d+)/state\.json$")
KEEP_LAST = 3  # older checkpoints are deleted, except the best one
CLAIM = "claim.json"  # who is training the run now
HEARTBEAT_S = 10.0  # the holder rewrites its claim this often
STALE_S = 60.0  # a claim not rewritten for this long is a dead process's


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
    cfg = state["config"]
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
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            for key, want in module.state_dict().items():
                # load_state_dict would silently cast, e.g. int8 weights into garbage floats
                if key in mine and mine[key].dtype != want.dtype:
                    raise BadInput(f"checkpoint tensor {prefix}{key} is {mine[key].dtype}, "
                                   f"the network needs {want.dtype}: the checkpoint is damaged")
            module.load_state_dict(mine)
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
        self.name = check_name(name, "run name")
        self.store = store.child(f"runs/{name}")

    def exists(self) -> bool:
        """Whether the run holds anything but a claim."""
        return any(key != CLAIM for key in self.store.list())

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

    def claim(self, resume: bool) -> Claim:
        """Hold the run for this process, or raise BadInput: two trainings of one run would
        interleave their checkpoints. With `resume`, a dead holder's claim (its process is
        gone from this host, or its heartbeat stopped) is taken over."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        for _ in range(2):
            if self.store.create(CLAIM, _claim_bytes(record)):
                return Claim(self, record)
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if holder.get("token") == record["token"]:
                return Claim(self, record)  # our create got through; its reply did not
            # Without `resume`, only a dead holder's claim on an empty run (it died before
            # writing anything) is taken over: there is nothing to continue.
            if _alive(holder) or (not resume and self.exists()):
                raise BadInput(
                    f"run {self.name!r} in {self.store.uri} is being trained by process "
                    f"{holder.get('pid')} on {holder.get('host')}: pick another --name, or "
                    f"once that process is gone, add --resume (after {STALE_S:.0f} s if it "
                    "ran on another machine)")
            self.store.delete(CLAIM)
        raise BadInput(f"run {self.name!r} was claimed by another process just now: "
                       "only one training of a run may run at a time")

    def _holder(self) -> dict | None:
        """The current claim (empty if unreadable: cut short by a crash), or None."""
        if not self.store.exists(CLAIM):
            return None
        try:
            holder = json.loads(self.store.read_bytes(CLAIM))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

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


def _claim_bytes(record: dict) -> bytes:
    return json.dumps({**record, "heartbeat": time.time()}).encode()


def _alive(holder: dict) -> bool:
    """Whether a claim's holder may still be training."""
    try:
        if not time.time() - float(holder.get("heartbeat", 0)) < STALE_S:
            return False
    except (TypeError, ValueError):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass  # someone else's process, or a pid we cannot test: assume it lives
    return True


class Claim:
    """A process's hold on a run, kept fresh by a heartbeat until `release()`."""

    def __init__(self, run: Run, record: dict):
        self.run, self.record = run, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only ages the claim
                self.run.store.write_bytes(CLAIM, _claim_bytes(self.record))

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        holder = self.run._holder()
        if holder and holder.get("token") == self.record["token"]:
            self.run.store.delete(CLAIM)


def read_state(ckpt: Store) -> dict:
    """A checkpoint's state.json, checked as data; its `config` a checked JobConfig."""
    where = ckpt.url("state.json")
    try:
        state = json.loads(ckpt.read_bytes("state.json"))
    except FileNotFoundError:
        raise BadInput(f"{ckpt.uri} is not a checkpoint: state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{where} is corrupt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadInput(f"{ckpt.uri} is not a cectl checkpoint")
    metrics = state.get("metrics", {})
    best = state.get("best_step")
    if not (_count(state.get("step")) and (best is None or _count(best))
            and isinstance(state.get("config"), dict) and isinstance(metrics, dict)
            and all(type(v) in (int, float) for v in metrics.values())):
        raise BadInput(f"{where} is damaged: it needs step numbers, a config mapping and "
                       "numeric metrics")
    state["config"] = load_config(JobConfig, stored=state["config"], source=where)
    return state


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


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

