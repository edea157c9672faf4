"""Who trains a run: `runs/RUN/claim.json`, one writer per run across hosts.

The claim (host, process id, a token, a heartbeat) is created atomically, so a second
training of a run is refused. Its holder rewrites it every HEARTBEAT_S with a conditional
write, and a claim not rewritten for STALE_S (or whose process is gone from this host)
belongs to a dead process: `--resume` takes it over with one conditional write, so of two
takeovers of one dead claim only one wins. Whoever writes the run checks the token first
(and the holder at every heartbeat): a process that was paused past STALE_S finds the
run taken over and stops before it writes again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from cectl.errors import BadInput, CectlError, Failure
from cectl.storage import Store

if TYPE_CHECKING:
    from cectl.runs import Run

CLAIM = "claim.json"  # who is training the run now
HEARTBEAT_S = 10.0  # the holder rewrites its claim this often
STALE_S = 60.0  # a claim not rewritten for this long is a dead process's
_held: set[str] = set()  # the tokens of the claims this process holds


def take_claim(run: Run, resume: bool) -> Claim:
    """Hold `run` for this process, or raise BadInput: two trainings of one run would
    interleave their checkpoints. With `resume`, a dead holder's claim (its process is gone
    from this host, or its heartbeat stopped) is taken over. Clears what the interrupted
    writes of earlier holders left behind."""
    run.root.check_conditional_writes()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    # Known as held before it is written: another thread here that reads it meanwhile
    # must find it alive.
    _held.add(record["token"])
    try:
        return _take(run, resume, record)
    except BaseException:
        _held.discard(record["token"])
        raise


def _take(run: Run, resume: bool, record: dict) -> Claim:
    for _ in range(3):
        current = read_claim(run.store)
        version = None
        if current is not None:
            holder, version = current
            # Without `resume`, only a dead holder's claim on an empty run (it died before
            # writing anything) is taken over: there is nothing to continue.
            if _alive(holder) or (not resume and run.exists()):
                raise BadInput(
                    f"run {run.name!r} in {run.store.uri} is being trained by process "
                    f"{holder.get('pid')} on {holder.get('host')}: pick another --name, or "
                    f"once that process is gone, add --resume (after {STALE_S:.0f} s if it "
                    "ran on another machine)")
        # One conditional write, which only one of several contenders can win: a create
        # where there is no claim, else the replacement of the dead one exactly as read.
        written = run.store.write_if(CLAIM, _claim_bytes(record), version)
        if written is None:  # refused; or our write went through and its reply did not
            now = read_claim(run.store)
            written = now[1] if now and now[0].get("token") == record["token"] else None
        if written is not None:
            claim = Claim(run, record, written)
            try:
                run.store.clear_partial_writes()
            except BaseException:
                claim.release()
                raise
            return claim
    raise BadInput(f"run {run.name!r} was claimed by another process just now: only one "
                   "training of a run may run at a time")


def read_claim(store: Store) -> tuple[dict, str] | None:
    """A run folder's claim (empty if unreadable: cut short, or hostile) and its version;
    None when there is none."""
    current = store.read_versioned(CLAIM)
    if current is None:
        return None
    data, version = current
    try:
        holder = json.loads(data)
    except (ValueError, RecursionError):
        holder = {}
    return (holder if isinstance(holder, dict) else {}), version


def _claim_bytes(record: dict) -> bytes:
    return json.dumps({**record, "heartbeat": time.time()}).encode()


def _alive(holder: dict) -> bool:
    """Whether a claim's holder may still be training."""
    try:
        # A heartbeat from the future (another host's clock, or a planted one) would hold
        # the run for ever: beyond STALE_S either way, it is stale.
        if not abs(time.time() - float(holder.get("heartbeat", 0))) < STALE_S:
            return False
    except (TypeError, ValueError, OverflowError):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    if holder.get("pid") == os.getpid():  # a container restarted in place reuses pids
        return holder.get("token") in _held
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        pass  # someone else's process, or a pid we cannot test: assume it lives
    return True


class Claim:
    """A process's hold on a run: the record in claim.json (host, pid, token, heartbeat).

    The process that took the claim (given its stored `version`) rewrites it every
    HEARTBEAT_S with a conditional write, so a takeover is never overwritten; writers check
    the token before every write (`check`). Whoever finds another token has lost the run
    and stops. A Ray worker writes under its driver's claim (no `version`: no heartbeat).
    """

    def __init__(self, run: Run, record: dict, version: str | None = None):
        self.run, self.record, self.version = run, record, version
        self.lost: dict | None = None  # the claim found in its place, once lost
        self._stop = threading.Event()
        self._thread = None
        if version is not None:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="claim")
            self._thread.start()

    def _beat(self) -> None:
        while self.lost is None and not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only ages the claim
                self._renew()

    def _renew(self) -> None:
        version = self.run.store.write_if(CLAIM, _claim_bytes(self.record), self.version)
        if version is None:  # taken over, or our last write went through unanswered
            current = read_claim(self.run.store)
            if current is None or current[0].get("token") != self.record["token"]:
                self.lost = current[0] if current else {}
                return
            version = current[1]
        self.version = version

    def check(self, read: bool = True) -> None:
        """Raise Failure if the run's claim is no longer this one; `read=False` only looks
        at what the heartbeat found (free, for every step)."""
        if self.lost is None and read:
            current = read_claim(self.run.store)
            if current is None or current[0].get("token") != self.record["token"]:
                self.lost = current[0] if current else {}
        if self.lost is None:
            return
        name = self.run.name
        if self.lost.get("token"):
            raise Failure(f"run {name!r} was taken over by process {self.lost.get('pid')} on "
                          f"{self.lost.get('host')} after this training's claim went "
                          f"unrenewed for {STALE_S:.0f} s: this training stops and writes "
                          "nothing more")
        raise Failure(f"run {name!r} lost its claim ({CLAIM} was removed or damaged by "
                      "another process): this training stops and writes nothing more")

    def release(self) -> None:
        """Stop the heartbeat and delete the claim if it is still this one. A claim that
        cannot be deleted (the store out of reach) goes stale. A beat in flight is waited
        for: landing between the read and the delete, it would leave the claim behind."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STALE_S)
            _held.discard(self.record["token"])
        if self.version is None or self.lost is not None:
            return
        with contextlib.suppress(CectlError, OSError):
            current = read_claim(self.run.store)
            if current and current[0].get("token") == self.record["token"]:
                self.run.store.delete_if(CLAIM, current[1])
