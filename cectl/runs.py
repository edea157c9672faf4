"""Runs in a store: their folders, who trains them, their checkpoints' state files.

STORE/runs/RUN/ holds config.yaml, metrics.jsonl, samples/step-NNNNNN.png, tensorboard/
and checkpoints/step-NNNNNN/{model.safetensors,state.json}; claim.json while a process
trains the run (`cectl.claims`: one writer per run, checked before every write).

state.json is a checkpoint's last file: a checkpoint without it is incomplete and
ignored. It holds everything but tensors (step, data position, config, metrics, best
step) and is checked as data when read. The tensors are `cectl.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from cectl.claims import CLAIM, Claim, take_claim
from cectl.config import load_config, validate_job
from cectl.errors import BadInput
from cectl.schema import JobConfig, is_count
from cectl.storage import Store, check_name

FORMAT = "cectl-checkpoint/2"
FORMATS = ("cectl-checkpoint/1", FORMAT)  # /1 keyed optimizer states by parameter index
STEP_DIR = re.compile(r"checkpoints/step-(\d+)/state\.json$")
KEEP_LAST = 3  # older checkpoints are deleted, except the best one


def step_dir(step: int) -> str:
    return f"checkpoints/step-{step:06d}"


def state_bytes(state: dict) -> bytes:
    """A checkpoint's state.json."""
    return json.dumps({"format": FORMAT, **state}, indent=2).encode()


class Run:
    """One training run's folder in a store."""

    def __init__(self, store: Store, name: str):
        self.name = check_name(name, "run name")
        self.root, self.store = store, store.child(f"runs/{name}")
        self.held: Claim | None = None  # the claim this process writes the run under

    def exists(self) -> bool:
        """Whether the run holds anything but a claim."""
        return any(key != CLAIM for key in self.store.list())

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(m.group(1)) for key in self.store.list("checkpoints/")
                      if (m := STEP_DIR.match(key)))

    def prune(self, keep: int | None) -> None:
        """Delete all but the last KEEP_LAST checkpoints, and `keep` (the best step)."""
        for step in self.steps()[:-KEEP_LAST]:
            if step != keep:
                # state.json first: cut short, the rest is an incomplete checkpoint, ignored.
                keys = sorted(self.store.list(f"{step_dir(step)}/"),
                              key=lambda key: not key.endswith("/state.json"))
                for key in keys:
                    self.store.delete(key)

    def summary(self) -> dict:
        """The run at its latest checkpoint: step reached, workers, resumes and resizes
        (resumes on another number of workers), last metrics."""
        state = read_state(self.checkpoint("latest"))
        lines = (self.store.read_bytes("metrics.jsonl").decode().splitlines()
                 if self.store.exists("metrics.jsonl") else [])
        return {"run": self.name, "step": state["step"],
                "target_steps": state["config"]["train"]["steps"],
                "workers": state.get("world", 1),
                "resumes": sum('"resumed"' in line for line in lines),
                "resizes": sum('"resized_from"' in line for line in lines),
                "metrics": state.get("metrics", {}), "checkpoints": self.store.url("checkpoints")}

    def claim(self, resume: bool) -> Claim:
        """Hold the run for this process (`cectl.claims`), or raise BadInput."""
        self.held = take_claim(self, resume)
        return self.held

    def check_claim(self, read: bool = True) -> None:
        """Before a write (and, without `read`, every step): raise Failure if this process
        writes under a claim it has lost."""
        if self.held is not None:
            self.held.check(read)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around a write to the run: the claim checked first; a write that fails because the
        run was taken over meanwhile (its new holder clears partial files) says so."""
        self.check_claim()
        try:
            yield
        except Exception:
            self.check_claim()
            raise

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
            if step not in steps:  # a run from before best steps were checkpointed ones
                raise BadInput(f"run {self.name!r}: its best step {step} has no checkpoint; "
                               f"it has steps {', '.join(map(str, steps))} and latest")
        elif which.isdigit() and int(which) in steps:
            step = int(which)
        else:
            raise BadInput(f"run {self.name!r} has no checkpoint {which!r}; it has steps "
                           f"{', '.join(map(str, steps))}, latest and best")
        return self.store.child(step_dir(step))


def read_state(ckpt: Store) -> dict:
    """A checkpoint's state.json, checked as data; its `config` a checked JobConfig."""
    where = ckpt.url("state.json")
    try:
        state = json.loads(ckpt.read_bytes("state.json"))
    except FileNotFoundError:
        raise BadInput(f"{ckpt.uri} is not a checkpoint: state.json is missing") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # also numbers of 4300 digits
        raise BadInput(f"{where} is corrupt") from None
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise BadInput(f"{ckpt.uri} is not a checkpoint this cectl reads (it reads "
                       f"{', '.join(FORMATS)})")
    metrics = state.get("metrics", {})
    best = state.get("best_step")
    world = state.get("world", 1)
    if not (is_count(state.get("step")) and (best is None or is_count(best))
            and is_count(world) and world >= 1
            and isinstance(state.get("config"), dict) and isinstance(metrics, dict)
            and all(type(v) in (int, float) for v in (*metrics.values(),
                                                      state.get("best_val", 0.0)))):
        raise BadInput(f"{where} is damaged: it needs step numbers, a worker count, a config "
                       "mapping and numeric metrics")
    if not _is_loss_scale(state.get("loss_scale", LOSS_SCALE)):
        raise BadInput(f"{where} is damaged: its loss_scale must map "
                       f"{', '.join(LOSS_SCALE)} to numbers")
    if not _is_data_position(state.get("data_position")):
        raise BadInput(f"{where} is damaged: its data_position must be {{\"samples\": N}}, "
                       "N a whole number below 2^63")
    state["config"] = load_config(JobConfig, stored=state["config"], source=where)
    return state


# fp16's GradScaler state (torch.amp.GradScaler.state_dict), with the defaults' shape.
LOSS_SCALE = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
              "growth_interval": 2000, "_growth_tracker": 0}


def _is_loss_scale(scale: object) -> bool:
    return (isinstance(scale, dict) and scale.keys() == LOSS_SCALE.keys()
            and all(type(v) in (int, float) and math.isfinite(v) and v >= 0
                    for v in scale.values()))


def _is_data_position(position: object) -> bool:
    """{"samples": N}, the samples the job consumed, or {"batches": N}, batches per rank
    (written before the position was global)."""
    return (isinstance(position, dict) and len(position) == 1
            and set(position) <= {"samples", "batches"}
            and is_count(count := next(iter(position.values()))) and count < 2**63)


def list_runs(store: Store) -> list[str]:
    return sorted({key.split("/")[1] for key in store.list("runs/") if key.count("/") >= 2})



def default_run_name(job: str | None) -> str:
    """JOB-date-time, from the recipe's file name."""
    return f"{Path(job).stem if job else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def job_config(args: list[str], data: str | None, run: Run | None = None
               ) -> tuple[DictConfig, str | None]:
    """The job config from a recipe (or, to resume, `run`'s stored YAML) and KEY=VALUE
    arguments, and the recipe named (None without one)."""
    jobs = [a for a in args if "=" not in a]
    if len(jobs) > 1 or (jobs and run is not None):
        raise BadInput(f"unexpected arguments {', '.join(jobs)}: give one JOB.yaml (none "
                       "with --resume) and KEY=VALUE overrides")
    job = jobs[0] if jobs else None
    flags = {"data": {"uri": data}} if data else None
    stored = source = None
    if run is not None:
        stored = run.store.read_bytes("config.yaml").decode(errors="replace")
        source = run.store.url("config.yaml")
    cfg = load_config(JobConfig, job, [a for a in args if "=" in a], flags, stored=stored,
                      source=source or "")
    return validate_job(cfg), job


def start_or_resume(store: Store, args: list[str], data: str | None, name: str | None,
                    resume: bool) -> tuple[DictConfig, str]:
    """`cectl train`'s rules: the config and name of a new run (refused if the name is
    taken), or of the run `--resume --name` continues (its stored config)."""
    if resume:
        cfg, _ = job_config(args, data, run_to_resume(store, name))
        return cfg, name
    cfg, job = job_config(args, data)
    return cfg, new_run(store, name or default_run_name(job)).name


def new_run(store: Store, name: str) -> Run:
    """A run to start under `name`: refused if the store already holds one."""
    run = Run(store, name)
    if run.exists():
        raise BadInput(f"run {name!r} already exists in {store.uri}: add --resume to "
                       "continue it, or pick another --name")
    return run


def run_to_resume(store: Store, name: str | None) -> Run:
    """The run `--resume --name NAME` continues: it must have been started."""
    if not name:
        raise BadInput("--resume needs --name RUN (see `cectl runs`)")
    run = Run(store, name)
    if not run.store.exists("config.yaml"):
        raise BadInput(f"no run {name!r} in {store.uri} to resume")
    return run


def best_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_summaries(store: Store) -> list[dict]:
    """Every run's summary; `step` None for a run with no checkpoint yet."""
    summaries = []
    for name in list_runs(store):
        run = Run(store, name)
        summaries.append(run.summary() if run.steps() else {"run": name, "step": None})
    return summaries


def pull_checkpoint(store: Store, name: str, which: str, dest: Path) -> tuple[str, Path]:
    """Copy checkpoint `which` (latest, best, a step) of a run to DEST/RUN/step-N."""
    source = Run(store, name).checkpoint(which)
    target = dest / name / source.uri.rstrip("/").rsplit("/", 1)[-1]
    for key in source.list():
        source.get_file(key, target / key)
    return source.uri, target
