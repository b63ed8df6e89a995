"""Safe writes: atomic files, directories built aside and swapped in, and one writer per store.

Ground floor (standard library and `filelock` only). Every neuralmaps writer (training-chunk
stores, map stores, exports, checkpoints, caches) follows these rules:

1. **Never a half-written file at its final name.** Write to a unique temporary name in the same
   folder (`.<name>.<random>.tmp`, so it is on the same filesystem and hidden), flush and fsync,
   then `os.replace` it onto the final name: readers see the old file or the new one, never a mix.
   Use `atomic_write_bytes` / `atomic_write_text`, or `atomic_path` when a library writes the file
   itself (torch.save, rasterio, zarr).
2. **Unique temporary names.** Never a fixed `path + ".tmp"`: two processes (or a stale temp of a
   killed one) must not collide. A failed write removes its own temp.
3. **Build aside, then swap.** Replacing an existing directory (a store under `--overwrite`) builds
   the new one next to it under a temporary name and only then swaps it in (`swap_into_place`), so
   bad new inputs or a crash leave the old one intact.
4. **Replace only what we wrote.** A writer deletes or replaces only a directory it recognises as
   its own (by the attributes it writes), never "whatever is at the path" (see
   `neuralmaps.data.store.check_output`).
5. **One writer per store.** Writers hold `writer_lock(path)` for the whole write. A second writer
   is refused at once (no waiting) with `StoreInUseError`, whose message names the holder (pid,
   host, start time, command). The lock is an OS lock (flock) on a hidden file next to the store,
   so it dies with its process: a SIGKILLed writer never leaves a stale lock.
6. **Path problems before expensive work.** Check output paths (`check_writable_parent`) before
   building anything, and raise `StorageError` (a ValueError) with one line that says what is wrong
   and what to do; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

__all__ = [
    "StorageError",
    "StoreInUseError",
    "atomic_write_bytes",
    "atomic_write_text",
    "json_safe",
    "atomic_path",
    "temp_sibling",
    "swap_into_place",
    "remove_stale_temps",
    "writer_lock",
    "lock_path",
    "check_writable_parent",
]


class StorageError(ValueError):
    """A path or store problem the user can fix (the message says what and how). A ValueError, so
    callers that treat bad input as ValueError (the CLI: one line, exit code 2) catch it too."""


class StoreInUseError(StorageError):
    """Another process holds the writer lock of the store."""


# -- files ---------------------------------------------------------------------------------------
def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique, hidden, not yet existing path next to `path`: `.<name>.<tag>-<random>`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem supports it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a unique temporary file path next to `path` (ending in `suffix`, for libraries that
    pick a format by it); when the block exits normally, the file written there replaces `path`
    atomically. On an exception the temp is removed and `path` is untouched. For libraries that
    write a path themselves (torch.save, rasterio, pickle)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have synced
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (unique temp in the same folder, fsync, rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


# -- directories ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the
    OS or filesystem does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_into_place(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory (or file) `new`, built next to `target`, to `target`, replacing
    what is there. With an existing `target` the two are exchanged atomically where the OS can (Linux),
    else `target` is first renamed aside; the old one is deleted only once `new` is in place. A
    crash in between leaves the old directory intact under `.<name>.old-*`, never half of both."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        _fsync_dir(target.parent)
        return
    if _exchange(new, target):  # `new` now holds the old one
        _fsync_dir(target.parent)
        _remove(new)
        return
    old = temp_sibling(target, "old")
    os.replace(target, old)
    os.replace(new, target)
    _fsync_dir(target.parent)
    _remove(old)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_stale_temps(target: str | os.PathLike) -> None:
    """Delete temporaries that a killed writer of `target` left next to it (`.<name>.tmp-*`,
    `.<name>.new-*`, `.<name>.old-*`). Call it only while holding `writer_lock(target)`."""
    target = Path(target)
    for tag in ("tmp", "new", "old"):
        for p in target.parent.glob(f".{target.name}.{tag}-*"):
            _remove(p)


# -- paths ---------------------------------------------------------------------------------------
def check_writable_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, without creating anything, that `path` could be created: it is not empty, no part of
    it is a regular file, and its nearest existing folder is writable. Returns the absolute path.
    Raises StorageError with one line naming the problem."""
    raw = os.fspath(path)
    if not str(raw).strip():
        raise StorageError(f"{what} path is empty; give a path such as out/store.zarr")
    p = Path(raw).expanduser().absolute()
    for parent in [p.parent, *p.parent.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise StorageError(f"{what} {raw}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StorageError(f"{what} {raw}: folder {parent} is not writable (permission denied); "
                                   "choose another path")
            return p
    return p


# -- the writer lock -----------------------------------------------------------------------------
def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of `target`: `.<name>.lock` next to it (it must outlive swaps of `target`)."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _holder_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock.holder")


def _describe_holder(target: Path) -> str:
    try:
        h = json.loads(_holder_path(target).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(h["since"])))
        return f"pid {h['pid']} on host {h['host']}, since {since}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not recorded yet)"


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, what: str = "store") -> Iterator[Path]:
    """Hold the exclusive writer lock of `target` (a store path) for the block.

    Refused at once (no waiting) with StoreInUseError naming the holder (pid, host, start time,
    command) when another process holds it. The holder's description is written next to the lock
    (`.<name>.lock.holder`) after acquiring, since the lock file itself is truncated by every
    contender. Raises StorageError when the lock cannot be created (read-only folder)."""
    import filelock

    target = Path(target).absolute()
    lp = lock_path(target)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
        try:  # an OS lock only: a soft (file-exists) lock would outlive a killed writer
            lock = filelock.FileLock(str(lp), timeout=0, thread_local=False, fallback_to_soft=False)
        except TypeError:  # filelock < 4 has no soft fallback
            lock = filelock.FileLock(str(lp), timeout=0, thread_local=False)
        lock.acquire()
    except filelock.Timeout:
        raise StoreInUseError(
            f"{what} {target} is in use: another neuralmaps writer holds its lock ({_describe_holder(target)}); "
            "wait for it to finish, or write to another path"
        ) from None
    except OSError as e:
        raise StorageError(f"cannot lock {what} {target}: {e.strerror or e} ({lp.parent})") from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join(sys.argv) or sys.executable}
        with contextlib.suppress(OSError):
            atomic_write_text(_holder_path(target), json.dumps(holder))
        yield lp
    finally:
        with contextlib.suppress(OSError):
            _holder_path(target).unlink()
        lock.release()


def json_safe(x):
    """Nested dicts / lists / tuples / arrays with numpy scalars made JSON-safe: numpy numbers and
    booleans become Python ones, arrays lists, NaN and inf floats None (JSON has neither)."""
    import math

    import numpy as np

    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x
