"""Atomic outputs: a stage writes into a temporary sibling and renames it into place at the end.

A killed or failed stage therefore never leaves an output that looks complete, and the previous
result stays in place until the new one is whole. A temporary name carries the host and process id
of its writer (`.<name>.<host>.<pid>.<random>.tmp`), so the next write of the same output removes
leftovers of writers on this host that are dead (SIGKILL, OOM killer) and never touches a live one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: Path, *, best_effort: bool = True) -> None:
    """Flush a file's data, or a folder's entries (new files, renames), to the disk; `best_effort`
    ignores a file system that refuses (some do for folders)."""
    with contextlib.suppress(OSError) if best_effort else contextlib.nullcontext():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux / old glibc: the move-aside path below is used
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` where `target` is; an earlier `target` is deleted only afterwards."""
    if tmp.is_dir() and (target.is_dir() and not target.is_symlink()):
        if not _exchange(tmp, target):
            # no atomic exchange here: move the old result aside (a later write restores it if we die)
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            tmp = old
        fsync_path(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the earlier result
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # a folder where a file goes (or the reverse): nothing else can replace it
    elif tmp.is_dir() and (target.exists() or target.is_symlink()):
        target.unlink()
    os.replace(tmp, target)
    fsync_path(target.parent)


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_host()}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Temporary siblings of `target` left by writers on this host that no longer run."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    host = _host()
    stale = []
    for sibling in target.parent.glob(f".{glob.escape(target.name)}.*"):
        rest = sibling.name[len(target.name) + 2:].split(".")
        if len(rest) != 4 or rest[3] not in ("tmp", "old") or rest[0] != host or not rest[1].isdigit():
            continue
        if int(rest[1]) != os.getpid() and not _alive(int(rest[1])):
            stale.append(sibling)
    return stale


def _sweep(target: Path) -> None:
    """Remove dead writers' leftovers; a moved-aside earlier result comes back if nothing replaced it."""
    for leftover in sorted(stale_temporaries(target), key=lambda p: not p.name.endswith(".old")):
        if leftover.name.endswith(".old") and not (target.exists() or target.is_symlink()):
            os.replace(leftover, target)  # killed between moving the old result aside and the swap
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path next to `target`; on success rename it onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success swap it in for `target`.

    The swap is one atomic exchange on Linux; elsewhere an existing `target` is moved aside first
    and deleted only after the new folder is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
