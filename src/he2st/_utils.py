"""Small helpers shared across he2st: atomic writes, content hashing, progress bars."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PathLike = str | os.PathLike


#: Marks the temporary files and folders of :func:`atomic_path` and :func:`atomic_dir`
#: (``.<name>.<random>.tmp[<suffix>]``): a temporary file never ends like its target
#: (``*.json``), so a reader that globs for results cannot take a half-written one.
TEMP_MARK = ".tmp"
# What a kill inside a write leaves: ``.<target>.<8 random>.tmp[.<ext>]``, and the names
# he2st used before the marker (``.<target>.<8 random><target suffix>``).
_TEMP_RE = re.compile(r"\..+\.[a-z0-9_]{8}(\.tmp(\.[A-Za-z0-9]+)?|\.[A-Za-z0-9]+)?")


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only on success.

    Readers of ``path`` never see a half-written file: either the old content or
    the new one. The temporary file is removed if the block raises; an
    :class:`OSError` without a file name (e.g. a full disk) gets ``path`` as its
    ``filename``, so the message says which file could not be written.

    Parameters
    ----------
    path
        Final path of the file; its parent folder is created if missing.
    suffix
        Suffix after the temporary marker (``.<name>.<random>.tmp<suffix>``), for
        writers that pick the format from the file name; default none.

    Yields
    ------
    Path
        The temporary file to write, in the same folder as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK + (suffix or ""))
    # mkstemp creates the file 0600: give it the mode any other new file gets.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _test_delay()
        os.replace(tmp_path, path)
    except OSError as exc:
        _raise_if_disk_full(exc, path)
        if exc.filename is None:
            exc.filename = str(path)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _test_delay() -> None:
    # Fault tests set HE2ST_ATOMIC_DELAY_S to widen the window between writing a
    # temporary file and renaming it, so that a kill lands inside writes.
    delay = os.environ.get("HE2ST_ATOMIC_DELAY_S")
    if delay:
        import time

        time.sleep(float(delay))


def clean_temp_files(folder: PathLike) -> list[Path]:
    """Remove the temporary files and folders that interrupted atomic writes left under ``folder``.

    Only call it while no other process writes there (e.g. under a run-folder lock).

    Parameters
    ----------
    folder
        Folder searched recursively.

    Returns
    -------
    list of Path
        What was removed.
    """
    removed = []
    for p in sorted(Path(folder).rglob(".*"), key=lambda q: len(q.parts), reverse=True):
        if not _TEMP_RE.fullmatch(p.name) or not (p.is_file() or p.is_dir()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _raise_if_disk_full(exc: OSError, path: Path) -> None:
    """Turn ENOSPC/EDQUOT while writing ``path`` into a :class:`~he2st.errors.DiskFullError` naming its folder."""
    from he2st.errors import DiskFullError

    if isinstance(exc, DiskFullError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    folder = path.parent
    cache = default_cache_dir()
    if folder.resolve().is_relative_to(cache.resolve()):
        hint = (
            f"free space there, or point he2st's cache at a larger disk with HE2ST_CACHE=/path (now {str(cache)!r})"
        )
    else:
        hint = "free space there or write to another disk"
    err = DiskFullError(
        f"no space left on the disk of {str(folder)!r} while writing {path.name!r} ({exc.strerror}); "
        f"nothing partial was left behind: {hint}"
    )
    err.errno = exc.errno  # still reads as ENOSPC to code that checks
    raise err from exc


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path`` only on success.

    For saved models and banks (several files that belong together): an interrupted
    write leaves the old directory (or nothing), never a half-written one.

    Parameters
    ----------
    path
        Final directory; an existing one is replaced when the block succeeds.

    Yields
    ------
    Path
        An empty temporary directory, in the same folder as ``path``, to fill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK))
    # mkdtemp creates the folder 0700: give it the mode any other new folder gets.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except OSError as exc:
        _raise_if_disk_full(exc, path)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def preallocate(path: PathLike) -> None:
    """Reserve the disk blocks of a (sparse) file, e.g. a fresh ``open_memmap``.

    A write through a memory map to a full disk kills the process with SIGBUS;
    reserving the blocks first turns that into an ``OSError`` (ENOSPC) here,
    which :func:`atomic_path` reports. File systems without ``fallocate`` skip it.

    Parameters
    ----------
    path
        The file, already at its final length.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read without changing it, where the OS allows).

    Returns
    -------
    int
        The mask, e.g. ``0o022``.
    """
    status = Path("/proc/self/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    # Elsewhere the only way is to set it and put it back (not thread-safe for that instant).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically.

    Parameters
    ----------
    path
        File to write (parent folders are created).
    text
        Content.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Parameters
    ----------
    path
        File to write (parent folders are created).
    obj
        JSON-serialisable object; numpy scalars and arrays and :class:`~pathlib.Path`
        are converted. Keys are sorted.
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """``default=`` hook of :func:`json.dumps` for the types he2st writes.

    Numpy scalars and arrays, paths, sets and dataclasses become JSON types;
    anything else raises :class:`TypeError` (as :func:`json.dumps` does).

    Parameters
    ----------
    o
        An object :mod:`json` cannot encode by itself.

    Returns
    -------
    Any
        A JSON-encodable equivalent.
    """
    import dataclasses

    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def json_default_or_str(o: Any) -> Any:
    """Like :func:`json_default`, but writes other objects as their ``str`` (for records, never re-read as values)."""
    try:
        return json_default(o)
    except TypeError:
        return str(o)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types, exactly as it reads back after a JSON round trip.

    Parameters
    ----------
    obj
        Dicts, lists, tuples, numbers, strings, numpy values, paths.

    Returns
    -------
    Any
        The same structure with tuples as lists, numpy values as Python ones
        and dict keys as strings, so it compares equal to its saved form.
    """
    return json.loads(json.dumps(obj, default=json_default))


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Any, Any]:
    """Module ``__getattr__`` and ``__dir__`` that import a public name's module on first use.

    Packages use it so that importing them stays cheap (torch, pandas and scanpy
    load only with the submodule that needs them)::

        __getattr__, __dir__ = lazy_exports(__name__, {"run_benchmark": "run"})

    Parameters
    ----------
    package
        The package's ``__name__``.
    exports
        Public name -> module that defines it: a submodule name relative to
        ``package``, or an absolute ``he2st.`` path.

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)`` to assign at module level.
    """
    import importlib
    import sys

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = exports[name]
        module = importlib.import_module(where if where.startswith("he2st.") else f"{package}.{where}")
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks.

    Parameters
    ----------
    path
        File to hash.
    chunk
        Bytes read at a time.

    Returns
    -------
    str
        The 64-character hexadecimal digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_arrays(*arrays: Any) -> str:
    """Hex sha256 over the bytes, dtypes and shapes of numpy arrays (or strings).

    Parameters
    ----------
    *arrays
        Arrays (anything :func:`numpy.ascontiguousarray` takes; object arrays are
        hashed through ``str`` of their items) or strings, hashed in order.

    Returns
    -------
    str
        The 64-character hexadecimal digest.
    """
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, str):
            h.update(a.encode())
            continue
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        if a.dtype == object:
            h.update("\x00".join(map(str, a.ravel())).encode())
        else:
            h.update(a.tobytes())
    return h.hexdigest()


def progress(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar unless quiet mode is on.

    Quiet mode is on when ``HE2ST_QUIET=1`` (set by ``--quiet`` and in CI) or when
    stderr is not a terminal, so logs stay readable.

    Parameters
    ----------
    iterable
        What to iterate over.
    description
        Label of the bar (default ``"working"``).
    total
        Number of items, for iterables without ``len``.

    Yields
    ------
    T
        The items of ``iterable``, unchanged.
    """
    if is_quiet():
        yield from iterable
        return
    from rich.progress import track

    yield from track(iterable, description=description or "working", total=total, transient=True)


def is_quiet() -> bool:
    """True when progress bars should be hidden.

    Returns
    -------
    bool
        True when ``HE2ST_QUIET`` is set (to anything but ``0``) or stderr is not a terminal.
    """
    import sys

    if os.environ.get("HE2ST_QUIET", "") not in ("", "0"):
        return True
    return not sys.stderr.isatty()


def default_cache_dir() -> Path:
    """Root of he2st's on-disk caches: ``$HE2ST_CACHE`` or ``~/.cache/he2st``.

    Returns
    -------
    Path
        The folder (not created here).
    """
    root = os.environ.get("HE2ST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "he2st"
