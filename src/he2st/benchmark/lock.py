"""One writer per run folder: an exclusive lock held for the whole run.

The lock is an OS lock (:func:`fcntl.flock`) on ``<out>/he2st.lock``, which
records the holder's pid, host and start time. The OS releases it when the
holder's process ends, however it ends (even SIGKILL), so a lock left by a dead
process never blocks a later run: the file stays, its content names the dead
holder, and the next run takes it over with a message. Where ``fcntl`` does not
exist (Windows), the file is created with ``O_CREAT | O_EXCL`` instead and a
holder whose pid no longer runs on this host is taken as dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from he2st.errors import He2stInputError

#: Name of the lock file inside a run folder.
LOCK_FILE = "he2st.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunFolderBusyError(He2stInputError):
    """Another process is writing the run folder."""


class RunFolderError(He2stInputError):
    """The run folder cannot be used (e.g. ``--out`` names a file)."""


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of run folder ``out`` (created if missing) for the block.

    Parameters
    ----------
    out
        The run folder.

    Yields
    ------
    Path
        The lock file.

    Raises
    ------
    RunFolderBusyError
        Another live process holds the folder; the message names it.
    RunFolderError
        ``out`` exists and is not a folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: not a folder (--out must name a run folder, new or existing)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = _acquire(path) if fcntl is not None else _acquire_exclusive(path)
    try:
        previous = _holder(path)
        if previous:
            # A holder that ended cleanly removes the file: this one died mid-run.
            print(f"[he2st] {out}: taking over the lock of a run that did not finish ({previous})", file=sys.stderr)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        yield path
    finally:
        # Remove the file before releasing the lock: _acquire re-checks the inode it locked.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path) -> int:
    """Open and flock ``path``; raise when a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(path) from None
        # The holder may have removed the file between our open and flock: then we
        # locked an orphan inode and must start again on the current file.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire_exclusive(path: Path) -> int:  # pragma: no cover - Windows
    """Create ``path`` exclusively; take over a lock whose holder no longer runs."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            info = _read(path)
            alive = info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1)))
            if alive and info:
                raise _busy(path) from None
            with contextlib.suppress(OSError):
                path.unlink()


def _pid_alive(pid: int) -> bool:  # pragma: no cover - Windows
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _holder(path: Path) -> str:
    """``pid P on host H since T`` from a lock file, or "" when it names no holder."""
    d = _read(path)
    if "pid" not in d:
        return ""
    return f"pid {d['pid']} on host {d.get('host', '?')}, started {d.get('started', '?')}"


def _busy(path: Path) -> RunFolderBusyError:
    holder = _holder(path) or "a process that has not yet recorded itself"
    return RunFolderBusyError(
        f"{path.parent}: another he2st run is writing this run folder ({holder}); "
        "wait for it to finish, or pick another --out"
    )


__all__ = ["LOCK_FILE", "RunFolderBusyError", "RunFolderError", "run_lock"]
