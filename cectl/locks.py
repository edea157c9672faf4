"""Lock files (flock) that a forked process does not keep.

An flock belongs to the open file, and a forked process shares its parent's open files:
a loader process forked while another thread held a lock (a shard's, a mask set's, the
local store's compare-and-swap of a run's claim) would hold it for its whole life, and
whoever waits for it would wait as long. So every lock file is opened here, a guard keeps
forks out while one is opened or closed, and a forked process closes its copies.
O_CLOEXEC does the same for a process that execs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_open_locks: set[int] = set()
_guard = threading.Lock()


def _close_in_child() -> None:
    for fd in _open_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _open_locks.clear()
    _guard.release()


os.register_at_fork(before=_guard.acquire, after_in_parent=_guard.release,
                    after_in_child=_close_in_child)


def open_lock(path: Path, mode: int = 0o600) -> int:
    """`path` opened for an flock (created with `mode` if missing); close with `close_lock`."""
    with _guard:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        _open_locks.add(fd)
    return fd


def close_lock(fd: int) -> None:
    with _guard:
        _open_locks.discard(fd)
        os.close(fd)


@contextlib.contextmanager
def machine_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """`path` locked against this machine's other processes and threads; without `wait`,
    BlockingIOError if it is held."""
    fd = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        close_lock(fd)


def beyond_newest(folder: Path, pattern: str, keep: int,
                  lock_of: Callable[[Path], Path]) -> Iterator[Path]:
    """The files of `folder` matching `pattern` but the `keep` newest, each yielded while
    its lock (`lock_of(path)`) is held here; those whose lock is held elsewhere (in use)
    are passed over. Another process may remove any of them meanwhile."""
    dated = []
    for path in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):  # another process dropped it
            dated.append((path.stat().st_mtime, path))
    for _, old in sorted(dated)[:-keep]:
        with contextlib.suppress(OSError), machine_lock(lock_of(old), wait=False):
            yield old
