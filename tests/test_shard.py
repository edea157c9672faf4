"""`cectl shard` and `cectl verify` through the real CLI, on local disk and a real S3 server."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import boto3
import numpy as np
import pytest
import webdataset as wds
from helpers import FlakyProxy, cectl
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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_paris_round_trip_verifies_and_keeps_every_pixel(where, paris, tmp_path, request):
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_env"), request.getfixturevalue("bucket")
        dst = f"s3://{bucket}/paris"
    else:
        dst = str(tmp_path / "paris")
    result = cectl("shard", paris, dst, "--resize", "0", "--shard-size", "30", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "79" in result.stdout
    assert cectl("verify", dst).returncode == 0

    if where == "s3":
        manifest = json.loads(s3_download(dst, "manifest.json", tmp_path, endpoint).read_text())
        shards = [str(s3_download(dst, s["name"], tmp_path, endpoint))
                  for s in manifest["splits"]["train"]["shards"]]
    else:
        manifest = json.loads((tmp_path / "paris" / "manifest.json").read_text())
        shards = [str(tmp_path / "paris" / s["name"])
                  for s in manifest["splits"]["train"]["shards"]]
    assert manifest["totals"]["samples"] == 79 and manifest["totals"]["shards"] == 3
    samples = read_webdataset(shards)
    assert len(samples) == 79
    for key, sample in samples.items():
        source = np.asarray(Image.open(paris / sample["meta"]["source"]).convert("RGB"))
        assert key == sample["meta"]["source"].removesuffix(".png")
        assert np.array_equal(sample["image"], source)
        assert (sample["meta"]["width"], sample["meta"]["height"]) == (227, 227)


def test_same_input_gives_byte_identical_shards_whatever_the_workers(paris, tmp_path):
    for workers in (1, 2):
        cectl("shard", paris, tmp_path / f"w{workers}", "--workers", workers, "--shard-size", 25,
              "--val-fraction", "0.2", check=True)
    one, two = (json.loads((tmp_path / f"w{w}" / "manifest.json").read_text()) for w in (1, 2))
    assert one == two
    assert set(one["splits"]) == {"train", "val"}
    for split in one["splits"].values():
        for s in split["shards"]:
            first, second = (tmp_path / w / s["name"] for w in ("w1", "w2"))
            assert first.read_bytes() == second.read_bytes()


def test_tar_tf_lists_image_and_json_for_every_sample(paris, tmp_path):
    cectl("shard", paris, tmp_path / "out", "--shard-size", 100, check=True)
    names = subprocess.run(["tar", "tf", tmp_path / "out/train/shard-000000.tar"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == 2 * 79
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "json"}


def many_inputs(paris: Path, folder: Path, copies: int) -> Path:
    """The shared images repeated under different names (symlinks)."""
    folder.mkdir()
    for i in range(copies):
        for image in sorted(paris.glob("*.png")):
            (folder / f"{i}-{image.name}").symlink_to(image)
    return folder


def test_killed_shard_run_resumes_without_rewriting_finished_shards(paris, tmp_path):
    src = many_inputs(paris, tmp_path / "src", 4)
    args = ["--shard-size", "8", "--workers", "1"]
    cectl("shard", src, tmp_path / "straight", *args, check=True)

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
    assert manifest["totals"]["samples"] == 158 and manifest["totals"]["shards"] == 40


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def jpeg_bytes(size=(100, 80), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_inputs_are_skipped_counted_and_named(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        (src / "sub" / f"good{i}.jpg").write_bytes(jpeg_bytes())
    (src / "truncated.jpg").write_bytes(jpeg_bytes((400, 300))[:600])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not an image\n")
    (src / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (src / "tiny.png").write_bytes(jpeg_bytes((32, 32)))
    (src / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    # Root reads any file, so point at one the kernel refuses to read instead of chmod 000.
    (src / "unreadable.jpg").symlink_to("/proc/self/mem")
    (src / "README.txt").write_text("not an image extension: ignored\n")

    result = cectl("shard", src, tmp_path / "out", "--workers", "2", "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 3
    assert manifest["skipped"] == {"broken-symlink": 1, "corrupt": 1, "empty": 1,
                                   "not-an-image": 1, "too-large": 1, "too-small": 1,
                                   "unreadable": 1}
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png", "tiny.png",
                 "dangling.jpg", "unreadable.jpg"):
        assert name in result.stderr
    assert cectl("verify", tmp_path / "out").returncode == 0


def test_verify_names_a_corrupted_shard_and_exits_1(paris, tmp_path):
    cectl("shard", paris, tmp_path / "out", "--shard-size", "40", check=True)
    shard = tmp_path / "out/train/shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = cectl("verify", tmp_path / "out")
    assert result.returncode == 1
    assert "train/shard-000001.tar" in result.stderr
    assert "train/shard-000000.tar" not in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["shard", "/no/such/folder", "{tmp}/out"], 2, "does not exist"),
        (["shard", "{tmp}/empty", "{tmp}/out"], 2, "no image files"),
        (["shard", "{tmp}/empty", "{tmp}/out", "--layout", "weird"], 2, "layout"),
        (["verify", "{tmp}/empty"], 2, "manifest.json not found"),
    ],
)
def test_usage_errors_exit_with_one_clear_sentence(args, code, message, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cectl(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_bucket_exits_2(paris, s3_env):
    result = cectl("shard", paris, "s3://no-such-bucket/x")
    assert result.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in result.stderr


def test_unreachable_endpoint_exits_1(paris, s3_env):
    from helpers import free_port

    result = cectl("shard", paris, "s3://bucket/x",  # two attempts: no need to wait out retries
                   env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                        "AWS_MAX_ATTEMPTS": "2"})
    assert result.returncode == 1
    assert "cannot reach S3" in result.stderr and "Traceback" not in result.stderr


def test_bad_credentials_exit_2(paris, tmp_path):
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
        result = cectl("shard", paris, "s3://bucket/x",
                       env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "wrong",
                            "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        server.terminate()
        server.wait()
    assert result.returncode == 2
    assert "denied" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
    assert "wrong" not in result.stderr  # never print credentials
