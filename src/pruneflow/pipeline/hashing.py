"""DVC's content hashes of files and folders, remembered per file version.

The plan (every `snakemake` start) and every stage record the hashes of the data they read, and the
MLflow runs name their inputs by the same hashes, so one file would otherwise be read again and again.
Like DVC's own state database, a file's md5 is kept under its (size, mtime, inode) in
`.pruneflow/hash-cache.json`; a changed file gets a new key. The cache is an optimisation only: a
lost or unreadable cache means the hashes are computed again, and concurrent writers each replace
the whole file atomically (last writer wins).

A file's hash is its md5; a folder's is the md5 of its sorted listing of (relative path, md5) with
".dir" appended: DVC 3's hashes, as dvc.lock records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

STATE_DIR = ".pruneflow"
CACHE_FILE = "hash-cache.json"
_CHUNK = 1 << 20
_MAX_ENTRIES = 20_000


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """md5 of files by (path, size, mtime, inode); `save()` writes only when something was added."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(state_dir if state_dir is not None else STATE_DIR) / CACHE_FILE
        self._entries: dict[str, list] = {}
        self._dirty = False
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self._entries = loaded

    def file_md5(self, path: Path) -> str:
        stat = path.stat()
        key = os.path.abspath(path)
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self._entries.get(key)
        if isinstance(entry, list) and entry[:3] == signature and len(entry) == 4:
            return entry[3]
        md5 = _file_md5(path)
        self._entries[key] = [*signature, md5]
        self._dirty = True
        return md5

    def dvc_hash(self, path: str | os.PathLike[str]) -> str:
        """DVC 3's md5 of a file or folder (a folder's hash ends in ".dir")."""
        path = Path(path)
        if path.is_file():
            return self.file_md5(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} is neither a file nor a folder")
        entries = [{"md5": self.file_md5(file), "relpath": file.relative_to(path).as_posix()}
                   for file in path.rglob("*") if file.is_file()]
        entries.sort(key=lambda entry: entry["relpath"])  # DVC's order: by the relative path string
        listing = json.dumps(entries, sort_keys=True).encode("utf-8")
        return hashlib.md5(listing).hexdigest() + ".dir"

    def save(self) -> None:
        if not self._dirty:
            return
        from pruneflow.pipeline.atomic import write_text

        if len(self._entries) > _MAX_ENTRIES:  # keep the newest half of a cache that keeps growing
            self._entries = dict(list(self._entries.items())[-_MAX_ENTRIES // 2:])
        with contextlib.suppress(OSError):
            write_text(self.path, json.dumps(self._entries, sort_keys=True))
        self._dirty = False


def dvc_hash(path: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None) -> str:
    """`HashCache.dvc_hash` through the project's cache (saved at once)."""
    cache = HashCache(state_dir)
    try:
        return cache.dvc_hash(path)
    finally:
        cache.save()
