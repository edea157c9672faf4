"""Untrusted inputs (issue 17, part B): crafted checkpoints and state files, sweep stores,
the shard cache, user text on the terminal, odd command-line values. Each ends in one
sentence (exit 2 for bad input, 1 for a failure) and writes nothing where it should not."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from helpers import TINY, assert_refused, cectl, free_port, tiny_job
from safetensors.torch import load_file, save_file

from cectl.cli.app import run
from cectl.data import TrainLoader
from cectl.errors import BadInput, Failure
from cectl.restore import load_generator
from cectl.shard_format import open_manifest
from cectl.storage import open_store

# 7. User text on the terminal is printed literally, by every command that prints it.

def test_every_command_prints_markup_in_paths_literally(tiny_checkpoint, tmp_path, capsys):
    from cectl.demo import make_facades

    odd = tmp_path / "[" / "x]"  # "[/x]" in every path below: a closing tag rich refuses
    images = make_facades(odd / "images", 12, size=72)
    store = odd / "store"
    shutil.copytree(Path(tiny_checkpoint).parents[3], store)  # holds the run "tiny"
    ckpt = store / "runs" / "tiny" / "checkpoints" / "step-000004"
    shards = odd / "shards"
    commands = {
        "shard": ["shard", odd / "images", shards, "--resize", "0", "--workers", "1"],
        "verify": ["verify", shards],
        "eval": ["eval", ckpt, "--data", shards, "--split", "train"],
        "export": ["export", ckpt, "-o", odd / "enc.safetensors"],
        "inpaint": ["inpaint", images[0], "--ckpt", ckpt, "-o", odd / "filled.png"],
        "runs": ["runs", "--store", store],
        "pull": ["pull", "tiny", "--store", store, "--dest", odd / "pulled"],
        "neighbors": ["neighbors", ckpt, "--data", shards, "--query", images[1], "-k", "2",
                      "-o", odd / "grid.png"],
    }
    for name, args in commands.items():
        code = run([str(a) for a in args])
        printed = capsys.readouterr()
        assert code == 0, f"{name}: {printed.err}"
        assert "[/x]" in " ".join((printed.out + printed.err).split()), name


# 13. Command-line values: one sentence, not a usage box; folders are not images.

def test_a_bad_option_value_is_one_sentence_with_exit_2(tmp_path, cli):
    assert_refused(cli("shard", tmp_path, tmp_path / "out", "--quality", "abc"), 2,
                   "--quality", "integer")
    assert not (tmp_path / "out").exists()


def test_an_unknown_option_is_one_sentence_and_help_still_prints(cli, capsys):
    assert_refused(cli("verify", "x", "--colour"), 2, "--colour")
    assert run(["verify", "--help"]) == 0
    assert "Re-read every shard" in capsys.readouterr().out


def test_a_folder_given_as_a_query_image_is_named_as_a_folder(tiny_checkpoint, tmp_path, cli):
    for args in (["neighbors", tiny_checkpoint, "--data", tmp_path, "--query", tmp_path],
                 ["inpaint", tmp_path, "--ckpt", tiny_checkpoint]):
        assert_refused(cli(*args), 2, str(tmp_path), "is a folder, not an image")


# 6, 9, 13. Checkpoint tensors are checked against what they load into, before anything
# is built on them.

def copy_run(tiny_checkpoint: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny run's store; (store, its latest checkpoint folder)."""
    store = tmp_path / "store"
    shutil.copytree(Path(tiny_checkpoint).parents[3], store)
    return store, store / "runs" / "tiny" / "checkpoints" / "step-000004"


def edit_tensors(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


EXP_AVG_SQ = "optim.G.state.encoder.0.weight.exp_avg_sq"


def test_a_wrong_shape_optimizer_state_is_refused_before_adam_runs(tiny_checkpoint, tmp_path):
    store, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_tensors(ckpt, lambda t: t.update({EXP_AVG_SQ: torch.ones(2)}))
    before = files_of(store)
    result = cectl("train", "train.steps=6", "--store", store, "--name", "tiny", "--resume")
    assert_refused(result, 2)
    assert EXP_AVG_SQ in result.stderr and "shape [2]" in result.stderr
    assert files_of(store) == before


@pytest.mark.parametrize(("case", "edit", "message"), [
    ("int8-optimizer", lambda t: t.update({EXP_AVG_SQ: t[EXP_AVG_SQ].to(torch.int8)}),
     "torch.int8"),
    ("float-rng", lambda t: t.update({"rng.torch": t["rng.torch"].float()}), "rng.torch"),
    ("negative-variance", lambda t: t.update({EXP_AVG_SQ: -t[EXP_AVG_SQ] - 1}), "negative"),
    ("nan-weight", lambda t: t["G.encoder.0.weight"].fill_(float("nan")), "NaN"),
    ("missing-state", lambda t: t.pop(EXP_AVG_SQ), "is missing"),
    ("stray-tensor", lambda t: t.update({"optim.D.state.extra": torch.ones(1)}), "extra"),
])
def test_crafted_checkpoint_tensors_are_refused_on_resume(case, edit, message, facade_shards,
                                                          tiny_checkpoint, tmp_path):
    from cectl.train import train

    store, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_tensors(ckpt, edit)
    before = files_of(store)
    with pytest.raises(BadInput) as caught:
        train(tiny_job(facade_shards, "train.steps=6"), open_store(str(store)), "tiny",
              resume=True)
    assert_refused(caught.value, 2, message)
    assert files_of(store) == before


def test_a_version_1_checkpoint_naming_a_parameter_out_of_range_is_refused(
        facade_shards, tiny_checkpoint, tmp_path):
    from cectl.train import train

    store, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_state(ckpt, lambda s: s.update(format="cectl-checkpoint/1"))

    def to_v1(tensors: dict) -> None:  # /1 keyed optimizer states by parameter index
        tensors["optim.G.999.exp_avg"] = tensors.pop("optim.G.state.encoder.0.weight.exp_avg")

    edit_tensors(ckpt, to_v1)
    with pytest.raises(BadInput) as caught:
        train(tiny_job(facade_shards, "train.steps=6"), open_store(str(store)), "tiny",
              resume=True)
    assert_refused(caught.value, 2, "optim.G.999.exp_avg", "999")


def test_nan_weights_are_refused_and_eval_json_is_strict(facade_shards, tiny_checkpoint,
                                                         tmp_path, cli):
    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    good = cli("eval", tiny_checkpoint, "--data", facade_shards, "--json")
    assert good.returncode == 0 and strict(good.stdout)["model"]["psnr_db"] > 0
    _, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_tensors(ckpt, lambda t: t["G.decoder.0.weight"].view(-1)[0].fill_(float("nan")))
    bad = cli("eval", ckpt, "--data", facade_shards, "--json")
    assert_refused(bad, 2, "G.decoder.0.weight", "NaN")
    assert bad.stdout == ""


def test_a_small_state_file_cannot_ask_for_a_huge_network(tiny_checkpoint, tmp_path):
    """1 KB of state.json asking for a 15 GiB generator: refused before it is built (the
    subprocess may use 4 GiB of address space)."""
    _, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_state(ckpt, lambda s: s["config"].update(
        model={**s["config"]["model"], "width": 512, "bottleneck": 16384},
        data={**s["config"]["data"], "image_size": 1024, "load_size": 1024}))
    limit = 4 * 2**30
    result = subprocess.run(
        [sys.executable, "-m", "cectl", "export", str(ckpt), "-o", str(tmp_path / "e.st")],
        capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert_refused(result, 2, "billion parameters")
    assert not (tmp_path / "e.st").exists()


@pytest.mark.parametrize("position", [{"samples": 1e30}, {"samples": -5}, {"samples": "8"},
                                      {"samples": 2**70}, {"samples": 8, "epoch": 0}, None])
def test_a_bad_data_position_is_refused(position, tiny_checkpoint, tmp_path):
    _, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_state(ckpt, lambda s: s.update(data_position=position))
    with pytest.raises(BadInput) as caught:
        load_generator(str(ckpt))
    assert_refused(caught.value, 2, "data_position")


@pytest.mark.parametrize("edit", [
    {"best_val": "low"}, {"world": 0}, {"world": 1.5}, {"loss_scale": {"scale": "big"}},
    {"loss_scale": {"scale": float("inf"), "growth_factor": 2.0, "backoff_factor": 0.5,
                    "growth_interval": 2000, "_growth_tracker": 0}}])
def test_a_bad_best_value_or_worker_count_is_refused(edit, tiny_checkpoint, tmp_path):
    _, ckpt = copy_run(tiny_checkpoint, tmp_path)
    edit_state(ckpt, lambda s: s.update(edit))
    with pytest.raises(BadInput) as caught:
        load_generator(str(ckpt))
    assert_refused(caught.value, 2, "state.json", "is damaged")


def test_a_state_file_with_a_number_too_long_to_read_is_corrupt(tiny_checkpoint, tmp_path):
    _, ckpt = copy_run(tiny_checkpoint, tmp_path)
    text = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(text.replace('"step": 4', '"step": ' + "9" * 5000))
    with pytest.raises(BadInput) as caught:
        load_generator(str(ckpt))
    assert_refused(caught.value, 2, "state.json", "is corrupt")


# 5. The shard cache holds only shards whose bytes match their name, in a private folder.

@pytest.fixture
def s3_shards(facade_shards, bucket, s3_env, tmp_path, monkeypatch) -> str:
    """The facade shards on S3, and a temp folder (so a shard cache) of this test's own."""
    s3 = boto3.client("s3", endpoint_url=s3_env)
    for path in filter(Path.is_file, Path(facade_shards).rglob("*")):
        s3.upload_file(str(path), bucket, f"shards/{path.relative_to(facade_shards)}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return f"s3://{bucket}/shards"


def first_batch(uri: str, *overrides: str):
    return next(TrainLoader(uri, open_manifest(uri), tiny_job(uri, *overrides), 0, 1))


def test_a_manifest_claiming_another_shards_sha256_caches_nothing(s3_shards, tmp_path):
    store = open_store(s3_shards)
    manifest = json.loads(store.read_bytes("manifest.json"))
    shards = manifest["splits"]["train"]["shards"]
    digests = [shard["sha256"] for shard in shards]
    for shard, other in zip(shards, digests[1:] + digests[:1], strict=True):
        shard["sha256"] = other  # a hostile copy: each shard claims a real shard's sha256
    store.write_bytes("manifest.json", json.dumps(manifest).encode())
    with pytest.raises(Failure) as caught:
        first_batch(s3_shards, "data.workers=0")
    assert_refused(caught.value, 1, "sha256", "manifest")
    assert not list(tmp_path.glob("cectl-shard-cache-*/*.tar"))


@pytest.mark.parametrize("case", ["dangling-link", "link-to-a-folder", "open-to-others",
                                  "another-users"])
def test_a_shard_cache_folder_others_could_write_is_refused(case, s3_shards, tmp_path):
    if case == "another-users" and os.geteuid() != 0:
        pytest.skip("only root can make a folder of another user's")
    folder = tmp_path / f"cectl-shard-cache-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    if case == "dangling-link":
        folder.symlink_to(elsewhere)
    elif case == "link-to-a-folder":
        elsewhere.mkdir()
        folder.symlink_to(elsewhere)
    else:
        folder.mkdir(mode=0o777 if case == "open-to-others" else 0o700)
        folder.chmod(0o777 if case == "open-to-others" else 0o700)
        if case == "another-users":
            os.chown(folder, 65534, 65534)
    with pytest.raises(Failure) as caught:
        first_batch(s3_shards, "data.workers=0")
    assert_refused(caught.value, 1, folder.name, "private")
    assert not (elsewhere.exists() and list(elsewhere.iterdir()))


# 8. Errors that are not cectl's, in a loader process, are one sentence too.

def test_a_full_disk_in_a_loader_process_is_one_sentence(s3_shards, tmp_path):
    """Caching a shard hits the file-size limit (EFBIG, as ENOSPC would), in a loader
    process of a real `cectl train`."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
              "from cectl.cli.app import run\n"
              "sys.exit(run(sys.argv[1:]))\n")
    result = subprocess.run(
        [sys.executable, "-c", script, "train", *TINY, "data.workers=1", "--data", s3_shards,
         "--store", str(tmp_path / "store"), "--name", "full"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert_refused(result, 1)
    assert "File too large" in result.stderr and "shard-0000" in result.stderr


# 12, 13. `cectl cluster local --join` names an address where nothing answers at once, and
# takes any name of the loopback.

@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_joining_an_address_where_nothing_answers_fails_at_once(host):
    address = f"{host}:{free_port()}"
    start = time.monotonic()
    result = cectl("cluster", "local", "--join", address, timeout=60)
    assert_refused(result, 2, address)
    assert f"nothing answers at {address}" in result.stderr
    assert time.monotonic() - start < 30



# 3, 4, 10. Sweeps: resumed from cectl's own checked JSON, never from Tune's pickles; no
# interpolation resolved; names kept inside the store. None of these starts Ray.

SECRET = "supersecretvalue123"
SWEEP = ("job: demo\nsamples: 2\ngrace_steps: 2\nreduction_factor: 2\n"
         "space:\n  optim.lr_ratio: uniform(1, 30)\n")


def sweep_args(tmp_path: Path, facade_shards: str, *extra: str) -> list[str]:
    (tmp_path / "tiny-sweep.yaml").write_text(SWEEP)
    return ["sweep", str(tmp_path / "tiny-sweep.yaml"), *TINY, "train.steps=4",
            "--data", facade_shards, "--store", str(tmp_path / "store"), "--cpu", *extra]


def finished_state(metrics: list[float]) -> dict:
    """A sweep state as cectl writes it, every trial done."""
    return {"format": "cectl-sweep/1",
            "definition": {"space": {"optim.lr_ratio": ["uniform", [1, 30]]},
                           "metric": "val_l2_pct", "samples": len(metrics)},
            "trials": [{"params": {"optim.lr_ratio": 2.0 + i}, "status": "done", "step": 4,
                        "metric": metric} for i, metric in enumerate(metrics)]}


class Planted:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_sweep_resumes_from_its_json_state_and_never_unpickles_the_store(
        facade_shards, tmp_path, capsys):
    sweeps = tmp_path / "store" / "sweeps"
    (sweeps / "tiny-sweep").mkdir(parents=True)
    marker = tmp_path / "unpickled"
    (sweeps / "tiny-sweep" / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    (sweeps / "tiny-sweep.json").write_text(json.dumps(finished_state([3.5, 1.25])))
    assert run(sweep_args(tmp_path, facade_shards, "--json")) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert [t["metric"] for t in report["trials"]] == [1.25, 3.5]
    best = yaml.safe_load((sweeps / "tiny-sweep-best.yaml").read_text())
    assert best["optim"]["lr_ratio"] == 3.0
    assert not marker.exists()


@pytest.mark.parametrize(("case", "message"), [
    ("not-json", "is corrupt"),
    ("value-outside-the-space", "is damaged"),
    ("nan-metric", "is damaged"),
    ("another-space", "another search space"),
    ("a-list", "is not a cectl sweep state"),
])
def test_a_damaged_sweep_state_is_refused_before_anything_runs(case, message, facade_shards,
                                                               tmp_path, cli):
    state = finished_state([3.5, 1.25])
    state["trials"][1]["status"] = "pending"
    if case == "value-outside-the-space":
        state["trials"][1]["params"]["optim.lr_ratio"] = 1e9
    elif case == "nan-metric":
        state["trials"][0]["metric"] = float("nan")
    elif case == "another-space":
        state["definition"]["space"]["optim.lr_ratio"] = ["uniform", [1, 300]]
    elif case == "a-list":
        state = [state]
    sweeps = tmp_path / "store" / "sweeps"
    sweeps.mkdir(parents=True)
    path = sweeps / "tiny-sweep.json"
    path.write_text("{[" if case == "not-json" else json.dumps(state))
    before = files_of(tmp_path / "store")
    assert_refused(cli(*sweep_args(tmp_path, facade_shards)), 2, "tiny-sweep.json", message)
    assert files_of(tmp_path / "store") == before and not (tmp_path / "store" / "runs").exists()


@pytest.mark.parametrize("arg", [
    "optim.beta1=choice(0.5, ${oc.env:AWS_SECRET_ACCESS_KEY})",
    "optim.beta1=choice(${oc.decode:'${oc.env:AWS_SECRET_ACCESS_KEY}'})",
    "optim.${oc.env:AWS_SECRET_ACCESS_KEY}=choice(1, 2)",
    'optim.beta1=choice(["\\x24{oc.env:AWS_SECRET_ACCESS_KEY}"])',  # YAML would unescape it
    "optim.beta1=${oc.env:AWS_SECRET_ACCESS_KEY}",
    "optim.beta1=uniform(0.1, 0.9, 5)",
])
def test_sweep_values_are_never_resolved_and_nothing_is_written(arg, facade_shards, tmp_path,
                                                                 cli, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    printed = cli(*sweep_args(tmp_path, facade_shards, arg))
    assert_refused(printed, 2, "optim.")
    assert SECRET not in printed.stdout + printed.stderr
    assert not (tmp_path / "store" / "sweeps").exists()


def test_a_sweep_recipe_space_with_an_interpolation_is_refused(facade_shards, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    args = sweep_args(tmp_path, facade_shards)
    (tmp_path / "tiny-sweep.yaml").write_text(
        SWEEP + "  optim.beta1: choice(0.5, ${oc.env:AWS_SECRET_ACCESS_KEY})\n")
    assert run(args) == 2
    printed = capsys.readouterr()
    assert "interpolation" in printed.err and SECRET not in printed.out + printed.err
    assert not (tmp_path / "store" / "sweeps").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "x" * 99])
def test_a_sweep_name_that_is_not_one_safe_segment_is_refused(name, facade_shards, tmp_path,
                                                              cli):
    assert_refused(cli(*sweep_args(tmp_path, facade_shards, "--name", name)), 2, "name")
    assert not (tmp_path / "store").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("text", ["[" * 100_000, '{"format": 1e999999}', "\xff\xfe"])
def test_a_manifest_that_is_no_json_cectl_reads_is_one_sentence(text, tmp_path):
    from cectl.shard_format import open_manifest

    (tmp_path / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BadInput) as caught:
        open_manifest(str(tmp_path))
    assert_refused(caught.value, 2, str(tmp_path / "manifest.json"))
