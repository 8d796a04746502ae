"""SIGKILL a stage process in the middle of writing one output, for the interruption tests.

`kill_hook_env(folder, pattern)` writes a `sitecustomize.py` into `folder` and returns the env
additions that make every Python process started with it (stage CLIs, Snakemake jobs, DVC stages)
load it. In a process that writes an output whose absolute path matches the glob `pattern`, the hook
cuts the temporary output to half its bytes (as a disk write stopped midway) and SIGKILLs the
process before the output could be put in place: no handler, no `finally`, no cleanup runs, just
as with the OOM killer or a preempted cluster job. Production code has no test switch for this.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_PATTERN = "PRUNEFLOW_TEST_KILL_AT"

_SITECUSTOMIZE = '''
import fnmatch
import importlib.abc
import importlib.util
import os
import signal
import sys

_PATTERN = os.environ.get("PRUNEFLOW_TEST_KILL_AT")


def _cut_in_half(path):
    files = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    if files:
        largest = max(files, key=os.path.getsize)
        with open(largest, "r+b") as handle:
            handle.truncate(os.path.getsize(largest) // 2)


def _install(module):
    swap_in = module._swap_in

    def killing_swap_in(tmp, target):
        if fnmatch.fnmatch(os.path.abspath(os.fspath(target)), _PATTERN):
            _cut_in_half(os.fspath(tmp))
            sys.stderr.write("kill_hook: SIGKILL while writing %s\\n" % target)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return swap_in(tmp, target)

    module._swap_in = killing_swap_in


class _PatchAtomicOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pruneflow.pipeline.atomic":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _install(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _PATTERN:
    sys.meta_path.insert(0, _PatchAtomicOnImport())
'''


def kill_hook_env(folder: Path, pattern: str, pythonpath: str | None = None) -> dict[str, str]:
    """Env additions that SIGKILL whichever process writes an output matching `pattern`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    paths = [str(folder), *([pythonpath] if pythonpath else []), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), ENV_PATTERN: pattern}


def visible_entries(folder: Path) -> set[str]:
    """What a user (or Snakemake, or DVC) sees in a folder: names not starting with a dot."""
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every visible file under `path` (or `path` itself) with its bytes; hidden temporaries are left out."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    files = (p.relative_to(path) for p in sorted(path.rglob("*")) if p.is_file())
    return {str(p): (path / p).read_bytes() for p in files if not any(part.startswith(".") for part in p.parts)}
