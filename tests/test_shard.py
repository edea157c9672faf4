"""`cectl shard` and `cectl verify` through the CLI, on local disk and a real S3 server."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import webdataset as wds
from helpers import FlakyProxy, assert_refused, cectl, image_bytes, png_header, shard_images
from PIL import Image


def read_webdataset(paths: list[str]) -> dict[str, dict]:
    samples = {}
    for sample in wds.WebDataset(paths, shardshuffle=False).decode("rgb8"):
        image = sample.get("jpg", sample.get("png"))
        samples[sample["__key__"]] = {"image": image, "meta": sample["json"]}
    return samples


def s3_download(uri_prefix: str, name: str, dest: Path, endpoint: str) -> Path:
    bucket, _, prefix = uri_prefix.removeprefix("s3://").partition("/")
    path = dest / name.replace("/", "_")
    boto3.client("s3", endpoint_url=endpoint).download_file(bucket, f"{prefix}/{name}", str(path))
    return path


def images_in(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.png"))


def table_row(text: str, first: str) -> list[str]:
    """The cells of the row of a printed table that starts with `first`."""
    rows = [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in text.splitlines() if line.startswith("│")]
    return next(row for row in rows if row[0] == first)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_paris_round_trip_verifies_and_keeps_every_pixel(where, cli, paris, tmp_path, request):
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_env"), request.getfixturevalue("bucket")
        dst = f"s3://{bucket}/paris"
    else:
        dst = str(tmp_path / "paris")
    count = images_in(paris)
    result = cli("shard", paris, dst, "--resize", "0", "--shard-size", "30", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert table_row(result.stdout, "total")[:3] == ["total", str(count),
                                                     str(math.ceil(count / 30))]
    verified = cli("verify", dst)
    assert verified.returncode == 0, verified.stderr

    if where == "s3":
        manifest = json.loads(s3_download(dst, "manifest.json", tmp_path, endpoint).read_text())
        shards = [str(s3_download(dst, s["name"], tmp_path, endpoint))
                  for s in manifest["splits"]["train"]["shards"]]
    else:
        manifest = json.loads((tmp_path / "paris" / "manifest.json").read_text())
        shards = [str(tmp_path / "paris" / s["name"])
                  for s in manifest["splits"]["train"]["shards"]]
    assert manifest["totals"]["samples"] == count
    assert manifest["totals"]["shards"] == len(shards) == math.ceil(count / 30)
    samples = read_webdataset(shards)
    assert len(samples) == count
    for key, sample in samples.items():
        source = np.asarray(Image.open(paris / sample["meta"]["source"]).convert("RGB"))
        assert key == sample["meta"]["source"].removesuffix(".png")
        assert np.array_equal(sample["image"], source)
        assert (sample["meta"]["width"], sample["meta"]["height"]) == (227, 227)


def many_inputs(paris: Path, folder: Path, copies: int) -> Path:
    """The shared images repeated under different names (symlinks)."""
    folder.mkdir()
    for i in range(copies):
        for image in sorted(paris.glob("*.png")):
            (folder / f"{i}-{image.name}").symlink_to(image)
    return folder


@pytest.mark.slow
def test_killed_shard_run_resumes_without_rewriting_finished_shards(paris, tmp_path):
    src = many_inputs(paris, tmp_path / "src", 4)
    args = ["--shard-size", "8", "--workers", "1"]
    shard_images(src, tmp_path / "straight", shard_size=8)

    dst = tmp_path / "crashed"
    job = subprocess.Popen([sys.executable, "-m", "cectl", "shard", src, dst, *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(dst.glob("train/shard-*.tar"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (dst / "manifest.json").exists(), "the run finished before it could be killed"
    finished = {p.name: p.stat() for p in dst.glob("train/shard-*.tar")}
    assert len(finished) >= 5

    result = cectl("shard", src, dst, *args)
    assert result.returncode == 0, result.stderr
    assert (json.loads((dst / "manifest.json").read_text())
            == json.loads((tmp_path / "straight" / "manifest.json").read_text()))
    kept = sum((dst / "train" / name).stat().st_ino == st.st_ino
               and (dst / "train" / name).stat().st_mtime_ns == st.st_mtime_ns
               for name, st in finished.items())
    assert kept >= len(finished) - 1  # the one being written at the kill may be redone
    assert not [p for p in dst.rglob("*") if ".partial-" in p.name]
    assert cectl("verify", dst).returncode == 0


@pytest.mark.slow
def test_shard_job_to_s3_survives_dropped_connections(paris, tmp_path, s3_env, bucket):
    proxy = FlakyProxy(int(s3_env.rsplit(":", 1)[1]))
    stop = threading.Event()

    def flap() -> None:
        time.sleep(0.3)
        while not stop.is_set():
            proxy.drop_for(0.4)
            stop.wait(0.9)

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    dst = f"s3://{bucket}/flaky"
    try:
        # The link is down 44% of the time: on a machine this loaded, a request can fail
        # the default 10 attempts (it did once in a full run), so ask for 20, as a user
        # on such a network would.
        result = cectl("shard", many_inputs(paris, tmp_path / "src", 2), dst,
                       "--shard-size", "4", "--workers", "2",
                       env={"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "20"})
    finally:
        stop.set()
        flapper.join()
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.dropped > 0
    assert cectl("verify", dst).returncode == 0
    manifest = json.loads(s3_download(dst, "manifest.json", tmp_path, s3_env).read_text())
    count = 2 * images_in(paris)
    assert manifest["totals"]["samples"] == count
    assert manifest["totals"]["shards"] == math.ceil(count / 4)


def test_bad_inputs_are_skipped_counted_and_named(cli, tmp_path):
    def jpeg(size: tuple[int, int]) -> bytes:
        return image_bytes(size, "JPEG", (200, 30, 30))

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        (src / "sub" / f"good{i}.jpg").write_bytes(jpeg((100, 80)))
    (src / "truncated.jpg").write_bytes(jpeg((400, 300))[:600])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not an image\n")
    (src / "bomb.png").write_bytes(png_header(30000, 30000))
    (src / "tiny.png").write_bytes(jpeg((32, 32)))
    (src / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    # Root reads any file, so point at one the kernel refuses to read instead of chmod 000.
    (src / "unreadable.jpg").symlink_to("/proc/self/mem")
    (src / "README.txt").write_text("not an image extension: ignored\n")

    result = cli("shard", src, tmp_path / "out", "--workers", "1", "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 3
    assert manifest["skipped"] == {"broken-symlink": 1, "corrupt": 1, "empty": 1,
                                   "not-an-image": 1, "too-large": 1, "too-small": 1,
                                   "unreadable": 1}
    skipped = {line.split()[1].removesuffix(":") for line in result.stderr.splitlines()
               if line.startswith("skipped ")}
    assert skipped == {"truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png", "tiny.png",
                       "dangling.jpg", "unreadable.jpg"}
    assert cli("verify", tmp_path / "out").returncode == 0


@pytest.fixture(scope="module")
def twelve_images(tmp_path_factory) -> tuple[Path, Path]:
    """Twelve generated images, and their shards (JPEG): three train shards of four."""
    from cectl.demo import make_facades

    root = tmp_path_factory.mktemp("twelve")
    make_facades(root / "images", 12, size=72)
    manifest = shard_images(root / "images", root / "shards", shard_size=4)
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 4]
    return root / "images", root / "shards"


@pytest.fixture
def small_shards(twelve_images, tmp_path) -> Path:
    """A copy of the twelve images' shards, for a test to damage or re-shard."""
    shutil.copytree(twelve_images[1], tmp_path / "shards")
    return tmp_path / "shards"


def test_same_input_gives_byte_identical_shards_whatever_the_workers(twelve_images, tmp_path):
    images, one_worker = twelve_images
    shard_images(images, tmp_path / "two", workers=2, shard_size=4)
    one, two = (json.loads((d / "manifest.json").read_text()) for d in (one_worker,
                                                                         tmp_path / "two"))
    assert one == two and len(one["splits"]["train"]["shards"]) == 3
    for s in one["splits"]["train"]["shards"]:
        assert (one_worker / s["name"]).read_bytes() == (tmp_path / "two" / s["name"]).read_bytes()


def test_tar_tf_lists_image_and_json_for_every_sample(twelve_images):
    manifest = json.loads((twelve_images[1] / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        names = subprocess.run(["tar", "tf", twelve_images[1] / shard["name"]],
                               capture_output=True, text=True, check=True).stdout.split()
        assert len(names) == 2 * shard["samples"]
        assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "json"}


def bad_shards(result) -> dict[str, str]:
    """verify's warnings: {shard name: its problems}."""
    lines = [line.removeprefix("bad shard ") for line in result.stderr.splitlines()
             if line.startswith("bad shard ")]
    return dict(line.split(": ", 1) for line in lines)


def test_verify_names_a_corrupted_shard_and_exits_1(cli, small_shards):
    shard = small_shards / "train/shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cli("verify", small_shards)
    assert_refused(result, 1, str(small_shards))
    assert list(bad_shards(result)) == ["train/shard-000001.tar"]


def test_verify_refuses_a_compressed_shard_that_training_would_refuse(cli, small_shards):
    """Its manifest entry rewritten to match: only the tar format is wrong."""
    import gzip
    import hashlib

    name = "train/shard-000001.tar"
    blob = gzip.compress((small_shards / name).read_bytes())
    (small_shards / name).write_bytes(blob)
    manifest = json.loads((small_shards / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == name:
            grown = len(blob) - entry["bytes"]
            entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    manifest["splits"]["train"]["bytes"] += grown
    manifest["totals"]["bytes"] += grown
    (small_shards / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", small_shards)
    assert_refused(result, 1, str(small_shards))
    assert "unreadable tar" in bad_shards(result)[name]


def test_verify_names_a_missing_shard_and_exits_1(cli, small_shards):
    (small_shards / "train/shard-000002.tar").unlink()
    result = cli("verify", small_shards)
    assert_refused(result, 1, str(small_shards))
    assert bad_shards(result) == {"train/shard-000002.tar": "missing"}


def test_resharding_with_another_shard_size_leaves_only_the_new_shards(cli, twelve_images,
                                                                       small_shards):
    before = json.loads((small_shards / "manifest.json").read_text())
    result = cli("shard", twelve_images[0], small_shards, "--shard-size", "8")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((small_shards / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == before["totals"]["samples"] == 12
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert len(names) == math.ceil(12 / 8) < len(before["splits"]["train"]["shards"])
    on_disk = sorted(str(p.relative_to(small_shards)) for p in small_shards.rglob("*.tar"))
    records = sorted(str(p.relative_to(small_shards / ".cectl-records").with_suffix(".tar"))
                     for p in (small_shards / ".cectl-records").rglob("*.json"))
    assert on_disk == records == names
    assert cli("verify", small_shards).returncode == 0


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["shard", "/no/such/folder", "{tmp}/out"], ["/no/such/folder"]),
        (["shard", "{tmp}/empty", "{tmp}/out"], ["{tmp}/empty"]),
        (["shard", "{tmp}/empty", "{tmp}/out", "--layout", "weird"], ["layout"]),
        (["verify", "{tmp}/empty"], ["{tmp}/empty/manifest.json", "cectl shard"]),
    ],
)
def test_usage_errors_exit_with_one_clear_sentence(args, names, cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_refused(result, 2, *[n.replace("{tmp}", str(tmp_path)) for n in names])


def test_an_s3_source_object_whose_name_leaves_its_folder_is_skipped(cli, s3_env, bucket,
                                                                      tmp_path):
    client = boto3.client("s3", endpoint_url=s3_env)
    for key in ("imgs/a.png", "imgs/b.png", "imgs//c.png"):  # the last lists as '/c.png'
        client.put_object(Bucket=bucket, Key=key, Body=image_bytes((200, 200)))
    result = cli("shard", f"s3://{bucket}/imgs", tmp_path / "out", "--workers", "1",
                 "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["totals"]["samples"], manifest["skipped"]) == (2, {"unreadable": 1})


def test_missing_bucket_exits_2(cli, paris, s3_env):
    assert_refused(cli("shard", paris, "s3://no-such-bucket/x"), 2, "'no-such-bucket'", s3_env)


def test_unreachable_endpoint_exits_1(cli, paris, s3_env):
    from helpers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    result = cli("shard", paris, "s3://bucket/x",  # two attempts: no need to wait out retries
                 env={"AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "2"})
    assert_refused(result, 1, endpoint, "AWS_ENDPOINT_URL")


def test_bad_credentials_exit_2(cli, paris, tmp_path):
    from helpers import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                import urllib.request

                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError as e:
                if getattr(e, "code", None):  # an HTTP error means it answers
                    break
                time.sleep(0.2)
        result = cli("shard", paris, "s3://bucket/x",
                     env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "wrong",
                          "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        server.terminate()
        server.wait()
    message = assert_refused(result, 2, "s3://bucket", "AWS_ACCESS_KEY_ID")
    assert "wrong" not in message  # never print credentials
