"""File helpers every stage shares (standard library only): atomic writes, so that a crash never
leaves a half-written file under the final name; sha256 of a file; one writer per folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_HASH_CHUNK = 1 << 20
# Temporary files are ".{final name}.tmp-{random}" in the final file's folder (os.replace is atomic
# only within one file system); TEMP_MARK lets a resuming writer recognize its own leftovers.
TEMP_MARK = ".tmp-"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (making a rename inside it durable); skipped where it cannot open."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside `path`, with open()'s permissions (mkstemp's 0600 would hide
    shards and reports from other users)."""
    while True:
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = False) -> Iterator[IO]:
    """Open ("w": UTF-8 text, or "wb") a temporary file beside `path` that replaces it on a clean exit
    and is removed on an error; `durable`: fsync the file and the folder (commit points)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    with atomic_open(path, "w", durable=durable) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> None:
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (keys in insertion order) plus a newline, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- one writer per folder

LOCK_NAME = ".pertvl.lock"


class FolderLock:
    """An exclusive flock on FOLDER/.pertvl.lock, which names the holder's host, pid and command;
    the kernel releases it when the holder ends, however it ends, so no lock goes stale."""

    def __init__(self, path: Path, fd: int, remove: bool = False):
        self.path, self._fd, self._remove = path, fd, remove

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            if self._remove:  # unlinked while still held: a writer that opened it before re-checks the inode
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, command: str, name: str = LOCK_NAME, remove: bool = False) -> FolderLock:
    """Take the exclusive write lock of `folder` (created if missing) for `command`, or raise a
    UserError naming the holder; `name`: the lock file; `remove`: delete it on release."""
    import fcntl
    import socket
    import time

    from pertvl.errors import UserError

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{folder} is in use by {holder}; wait for it to finish, stop it, or choose another output folder"
            ) from None
        try:  # the file we locked is still the one under `path` (a removing holder may have unlinked it)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}: {command}\n".encode(), 0)
    return FolderLock(path, fd, remove=remove)
