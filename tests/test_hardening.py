"""Hostile inputs: shared checkpoints, manifests and names, secrets in the environment,
two trainings of one run. Each ends in one sentence (exit 2) and writes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, image_bytes, png_header, tiny_job
from PIL import Image
from safetensors.torch import load_file, save_file

from cectl.data import TrainLoader
from cectl.errors import BadInput
from cectl.images import Skip, decode
from cectl.inpaint import inpaint
from cectl.restore import load_generator
from cectl.runs import CLAIM, Run
from cectl.shard_format import read_manifest, read_samples
from cectl.storage import open_store
from cectl.verify import PixelBudget, run_verify

SECRET = "supersecretvalue123"
PILLOW_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own Image.MAX_IMAGE_PIXELS


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shards(root: Path, shard: bytes, samples: int) -> str:
    """DST with one train shard holding `shard` and a manifest that claims `samples`."""
    (root / "train").mkdir(parents=True)
    (root / "train" / "shard-000000.tar").write_bytes(shard)
    entry = {"name": "train/shard-000000.tar", "samples": samples, "bytes": len(shard),
             "sha256": hashlib.sha256(shard).hexdigest()}
    manifest = {"format": "cectl-shards/1", "splits": {"train": {
        "shards": [entry], "samples": samples, "bytes": len(shard)}},
        "totals": {"samples": samples, "shards": 1, "bytes": len(shard)}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def copy_checkpoint(tiny_checkpoint: str, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    return ckpt


def edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    state = edit(state) or state
    (ckpt / "state.json").write_text(json.dumps(state))


# 1. Secrets: interpolations are refused, never resolved, never echoed.

def test_checkpoint_config_interpolation_is_refused_without_the_secret(
        tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_state(ckpt, lambda s: s["config"]["model"].update(
        width="${oc.env:AWS_SECRET_ACCESS_KEY}"))
    with pytest.raises(BadInput) as caught:
        load_generator(str(ckpt))
    assert SECRET not in assert_refused(caught.value, 2, "model.width", "state.json", "${")


def test_override_interpolation_exits_2_without_the_secret(cli, facade_shards, tmp_path):
    result = cli("train", "train.steps=${oc.env:AWS_SECRET_ACCESS_KEY}", "--data",
                 facade_shards, "--store", tmp_path / "store",
                 env={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert_refused(result, 2, "train.steps", "${")
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "store" / "runs").exists()


# 2. Credentials in URLs are masked in every message.

def test_endpoint_credentials_are_masked(cli, s3_env):
    endpoint = s3_env.replace("http://", "http://keyid:PASSWORD42@")
    result = cli("verify", "s3://no-such-bucket-here/p", env={"AWS_ENDPOINT_URL": endpoint})
    assert_refused(result, 2, "'no-such-bucket-here'", "http://***@127.0.0.1")
    assert "PASSWORD42" not in result.stdout + result.stderr


# 11. User text in errors is printed literally (rich markup escaped).

@pytest.mark.parametrize("secret", ["PASSWORD42", "wJal/PASSWORD42/bPxR", "p@ss/PASSWORD42"])
def test_credentials_in_an_s3_uri_are_refused_and_masked(cli, s3_env, secret):
    result = cli("verify", f"s3://user:{secret}@bkt/p")
    assert_refused(result, 2, "s3://***@bkt/p", "AWS_ACCESS_KEY_ID")
    assert "PASSWORD42" not in result.stdout + result.stderr and "user" not in result.stderr


def test_an_s3_uri_whose_bucket_is_no_bucket_name_is_refused_in_one_sentence(cli, s3_env):
    assert_refused(cli("verify", "s3://My_Bucket/p"), 2, "'My_Bucket' is not a bucket name")


def test_run_name_with_markup_is_printed_literally(cli, facade_shards, tmp_path):
    result = cli("train", "--name", "[/x]", "--data", facade_shards, "--store", tmp_path)
    assert_refused(result, 2, "run name", "'[/x]'")


# 3. Run names are one path segment of safe characters.

@pytest.mark.parametrize("name", ["../../escape", "/abs/x", "a/b", "..", ".hidden", "",
                                  "a b", "x" * 101])
def test_unsafe_run_names_are_refused(name, tmp_path):
    with pytest.raises(BadInput) as caught:
        Run(open_store(str(tmp_path / "store")), name)
    assert_refused(caught.value, 2, "run name")
    assert not (tmp_path / "store").exists() and not (tmp_path / "escape").exists()


def test_train_with_an_escaping_name_writes_nothing(cli, facade_shards, tmp_path):
    store = tmp_path / "a" / "b"
    result = cli("train", "--name", "../../escape", "train.steps=1", "--data", facade_shards,
                 "--store", store)
    assert_refused(result, 2, "run name", "'../../escape'")
    assert not (tmp_path / "escape").exists() and not (store / "runs").exists()


# 4. Shard names stay under the shard root, local and S3.

@pytest.mark.parametrize("name", ["../../../../etc/passwd", "train/../../outside.tar",
                                  "/etc/passwd", "val/shard-000000.tar"])
def test_manifest_shard_names_outside_their_split_are_refused(name, tmp_path):
    root = Path(write_shards(tmp_path / "shards", tar_bytes({"a.png": image_bytes()}), 1))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput) as caught:
        run_verify(str(root), console=None)
    assert_refused(caught.value, 2, "manifest.json", repr(name))


def test_s3_manifest_with_escaping_shard_names_is_refused(s3_env, bucket):
    store = open_store(f"s3://{bucket}/shards")
    manifest = {"format": "cectl-shards/1", "splits": {"train": {"shards": [
        {"name": "train/../../elsewhere/x.tar", "samples": 1, "bytes": 1, "sha256": "0"}],
        "samples": 1, "bytes": 1}}, "totals": {"samples": 1, "shards": 1, "bytes": 1}}
    store.write_bytes("manifest.json", json.dumps(manifest).encode())
    with pytest.raises(BadInput) as caught:
        read_manifest(store)
    assert_refused(caught.value, 2, f"s3://{bucket}/shards/manifest.json",
                   "'train/../../elsewhere/x.tar'")
    with pytest.raises(BadInput) as caught:
        store.read_bytes("../elsewhere/x.tar")
    assert_refused(caught.value, 2, "'../elsewhere/x.tar'")


# 8. The manifest is validated as data.

@pytest.mark.parametrize("case", ["array", "splits-string", "samples-string", "samples-inf",
                                  "samples-negative", "totals-wrong", "shards-not-list",
                                  "sha256-a-path"])
def test_malformed_manifests_are_bad_input(case, tmp_path):
    root = Path(write_shards(tmp_path / "shards", tar_bytes({"a.png": image_bytes()}), 1))
    manifest = json.loads((root / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    if case == "array":
        manifest = [manifest]
    elif case == "splits-string":
        manifest["splits"] = "train"
    elif case == "samples-string":
        train["shards"][0]["samples"] = "1"
    elif case == "samples-inf":
        train["shards"][0]["samples"] = train["samples"] = float("inf")
    elif case == "samples-negative":
        train["shards"][0]["samples"] = train["samples"] = -5
        manifest["totals"]["samples"] = -5
    elif case == "totals-wrong":
        manifest["totals"]["samples"] = 7
    elif case == "shards-not-list":
        train["shards"] = "train/shard-000000.tar"
    elif case == "sha256-a-path":
        train["shards"][0]["sha256"] = "../../../home/user/.bashrc"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput) as caught:
        read_manifest(open_store(str(root)))
    assert_refused(caught.value, 2, str(root / "manifest.json"))


# 5. One training per run: an atomic claim, held while training.

def test_a_second_training_of_a_claimed_run_is_refused_and_writes_nothing(facade_shards,
                                                                          tmp_path):
    store = open_store(str(tmp_path))
    run = Run(store, "conc")
    claim = run.claim(resume=False)
    from cectl.train import train

    for resume in (False, True):
        with pytest.raises(BadInput) as caught:
            train(tiny_job(facade_shards, "train.steps=1"), store, "conc", resume=resume)
        assert_refused(caught.value, 2, "'conc'", f"process {os.getpid()} on")
    assert run.store.list() == [CLAIM]
    claim.release()
    assert not run.exists()
    run.claim(resume=False).release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_many_simultaneous_claims_exactly_one_wins(where, tmp_path, request):
    uri = (f"s3://{request.getfixturevalue('bucket')}/store" if where == "s3"
           else str(tmp_path))
    run = Run(open_store(uri), "conc")
    start, won, lost = threading.Barrier(6), [], []

    def contend() -> None:
        start.wait()
        try:
            won.append(run.claim(resume=False))
        except BadInput:
            lost.append(1)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(lost)) == (1, 5)
    won[0].release()
    assert not run.store.exists(CLAIM)


def test_a_dead_process_claim_is_taken_over_only_with_resume(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    claim = json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                        "token": "old", "heartbeat": time.time()}).encode()
    empty = Run(open_store(str(tmp_path)), "died-at-start")
    empty.store.write_bytes(CLAIM, claim)
    empty.claim(resume=False).release()  # nothing to continue, nothing to protect

    run = Run(open_store(str(tmp_path)), "crashed")
    run.store.write_bytes("config.yaml", b"{}")
    run.store.write_bytes(CLAIM, claim)
    with pytest.raises(BadInput) as caught:
        run.claim(resume=False)
    assert_refused(caught.value, 2, "'crashed'", "--resume")
    taken = run.claim(resume=True)
    assert json.loads(run.store.read_bytes(CLAIM))["token"] == taken.record["token"]
    taken.release()


def test_a_live_claim_from_another_machine_holds_until_its_heartbeat_stops(tmp_path):
    run = Run(open_store(str(tmp_path)), "remote")
    holder = {"host": "elsewhere", "pid": 1, "token": "theirs", "heartbeat": time.time()}
    run.store.write_bytes(CLAIM, json.dumps(holder).encode())
    with pytest.raises(BadInput) as caught:
        run.claim(resume=True)
    assert_refused(caught.value, 2, "'remote'", "on elsewhere")
    holder["heartbeat"] = time.time() - 3600
    run.store.write_bytes(CLAIM, json.dumps(holder).encode())
    taken = run.claim(resume=True)
    assert json.loads(run.store.read_bytes(CLAIM))["token"] == taken.record["token"] != "theirs"
    taken.release()
    assert not run.store.exists(CLAIM)


# 6. Checkpoint configs are checked before any network is built.

@pytest.mark.parametrize(("case", "edit", "names"), [
    ("huge-width", lambda s: s["config"]["model"].update(width=200000), ["model.width"]),
    ("negative-width", lambda s: s["config"]["model"].update(width=-3), ["model.width"]),
    ("huge-image", lambda s: s["config"]["data"].update(image_size=10**6), ["data.image_size"]),
    ("unknown-key", lambda s: s["config"]["model"].update(colour=1), ["model.colour"]),
    ("state-list", lambda s: [s], ["cectl-checkpoint/2"]),
    ("config-string", lambda s: s.update(config="model: {width: 3}"), ["config"]),
    ("step-string", lambda s: s.update(step="4"), ["step"]),
])
def test_bad_checkpoint_state_is_bad_input(case, edit, names, tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    edit_state(ckpt, edit)
    with pytest.raises(BadInput) as caught:
        load_generator(str(ckpt))
    where = str(ckpt / "state.json") if case != "state-list" else str(ckpt)
    assert_refused(caught.value, 2, where, *names)


# 7. Tensor dtypes are checked on load.

def test_int8_weights_are_refused(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors = {k: v.to(torch.int8) if k.startswith("G.") and v.is_floating_point() else v
               for k, v in tensors.items()}
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(BadInput) as caught:
        load_generator(str(ckpt))
    assert_refused(caught.value, 2, "G.", "torch.int8", "torch.float32")


# 10. Loader errors name the shard in one sentence, also from loader processes.

@pytest.mark.parametrize("case", ["bomb", "count"])
def test_loader_process_errors_reach_the_trainer_as_one_sentence(case, tmp_path):
    if case == "bomb":
        shard = tar_bytes({"a.png": png_header(20000, 20000), "a.json": b"{}"})
        root = write_shards(tmp_path / "shards", shard, 1)
    else:
        shard = tar_bytes({"a.png": image_bytes(), "a.json": b"{}"})
        root = write_shards(tmp_path / "shards", shard, 2)
    cfg = tiny_job(root, "data.workers=1", "data.batch_size=1")
    loader = TrainLoader(root, read_manifest(open_store(root)), cfg, rank=0, world=1)
    with pytest.raises(BadInput) as caught:
        next(loader)
    assert_refused(caught.value, 2, "train/shard-000000.tar")


@pytest.mark.parametrize("case", ["garbage", "8GiB-member"])
def test_unreadable_shards_are_named(case, tmp_path):
    if case == "garbage":
        shard = b"this is not a tar file at all" * 40
    else:
        info = tarfile.TarInfo("a.png")
        info.size = 8 * 2**30
        shard = info.tobuf() + b"\x89PNG" * 100
    store = open_store(write_shards(tmp_path / "shards", shard, 1))
    with pytest.raises(BadInput) as caught:
        read_samples(store, "train/shard-000000.tar")
    assert_refused(caught.value, 2, "train/shard-000000.tar", "cectl verify")


def test_empty_secret_key_is_a_credentials_error(cli, s3_env, bucket):
    result = cli("verify", f"s3://{bucket}/x", env={"AWS_SECRET_ACCESS_KEY": ""})
    assert_refused(result, 2, "AWS_SECRET_ACCESS_KEY")


# 12. Inpaint details.

def test_inpaint_refuses_an_image_too_small_for_the_hole(tiny_checkpoint, tmp_path):
    src = tmp_path / "dot.png"
    src.write_bytes(image_bytes((1, 1)))
    with pytest.raises(BadInput) as caught:
        inpaint(src, tiny_checkpoint, "center", tmp_path / "out.png")
    assert_refused(caught.value, 2, str(src), "1x1")
    assert not (tmp_path / "out.png").exists()


def test_inpaint_keeps_sixteen_bit_grey_grey(tiny_checkpoint, tmp_path):
    src = tmp_path / "deep.png"
    Image.fromarray(torch.randint(0, 65535, (80, 96), dtype=torch.int32).numpy()
                    .astype("uint16")).save(src)
    assert Image.open(src).mode.startswith("I")
    inpaint(src, tiny_checkpoint, "center", tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").mode == "L"


# Also: verify's decodes share a pixel budget; pruning leaves no empty folders.

class WatchedCondition(threading.Condition):
    """A Condition that says when a thread first waits on it: found the budget short."""

    def __init__(self):
        super().__init__()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited.set()
        return super().wait(timeout)


def test_decodes_over_the_pixel_budget_wait_for_each_other():
    budget, order = PixelBudget(100), []
    budget._changed = WatchedCondition()
    first_in, let_go = threading.Event(), threading.Event()

    def first() -> None:
        with budget.hold(60):
            order.append("first in")
            first_in.set()
            let_go.wait(5)
            order.append("first out")

    def second() -> None:
        first_in.wait(5)
        with budget.hold(1000):  # more than the budget: waits, then runs alone
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert budget._changed.waited.wait(5), "the second decode never waited"
    assert order == ["first in"]
    let_go.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first in", "first out", "second in"]


def test_decode_does_not_change_pillows_global_limit():
    with pytest.raises(Skip) as caught:
        decode(png_header(10001, 10001))  # over cectl's MAX_PIXELS, under Pillow's refusal
    assert caught.value.reason == "too-large"
    assert decode(image_bytes((30, 20))).image.size == (30, 20)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_LIMIT  # as Pillow set it, after all that


def test_a_finished_training_releases_its_claim(facade_shards, tmp_path):
    from cectl.train import train

    train(tiny_job(facade_shards, "train.steps=1"), open_store(str(tmp_path)), "done")
    run = tmp_path / "runs" / "done"
    assert (run / "checkpoints" / "step-000001" / "state.json").is_file()
    assert not (run / CLAIM).exists()
