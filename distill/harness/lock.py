"""The results-folder lock: one ``run`` at a time per results folder (``.harness.lock``)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.harness.profiles import HarnessError

LOCK_NAME = ".harness.lock"


def _lock_holder(handle: Any) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except ValueError:
        info = {}
    pid, host = info.get("pid", "?"), info.get("host", "?")
    alive = ""
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = "; that process is gone but a training it started still runs"
        except PermissionError:
            pass
    return f"pid {pid} on {host}, started {info.get('started', '?')}{alive}"


def running_holder(directory: Path) -> str | None:
    """Who holds the results lock of ``directory`` now (None: nobody); takes no lock."""
    path = directory / LOCK_NAME
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(handle)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


@contextmanager
def results_lock(directory: Path) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``directory/.harness.lock`` (yields its file descriptor).

    The lock file records pid, host and start time for the message a second run prints. The kernel
    drops the lock when every holder has exited, so a killed run leaves no stale lock; runs started
    with the descriptor (``pass_fds``) keep it until they end, so an orphaned training still
    blocks a new harness run on the same folder.
    """
    path = directory / LOCK_NAME
    directory.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HarnessError(
                f"results folder {directory} is in use by another harness run "
                f"({_lock_holder(handle)}); wait for it to finish, or use another --results-dir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv,
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        try:
            yield handle.fileno()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
