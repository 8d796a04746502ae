"""SIGKILL (or hold) a stage process in the middle of writing one output, for the interruption tests.

`kill_hook_env(folder, pattern)` writes a `sitecustomize.py` into `folder` and returns the env
additions that make every Python process started with it (stage CLIs, Snakemake jobs, DVC stages)
load it. In a process that writes an output whose absolute path matches the glob `pattern`, the hook
cuts the temporary output to half its bytes (as a disk write stopped midway) and SIGKILLs the
process before the output could be put in place: no handler, no `finally`, no cleanup runs, just
as with the OOM killer or a preempted cluster job.

`pause_hook_env(folder, pattern)` instead holds such a process right before it would put the output
in place: it writes `folder/paused` (its pid) and waits until `folder/release` exists. Tests wait on
that file, a state, rather than on a sleep. Production code has no test switch for either.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_PATTERN = "PRUNEFLOW_TEST_KILL_AT"

# A sitecustomize helper both hooks share: run `patch(module)` right after `name` is imported.
PATCH_ON_IMPORT = '''
import importlib.abc
import importlib.util
import sys


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch_on_import(name, patch):
    sys.meta_path.insert(0, _PatchOnImport(name, patch))
'''

_SITECUSTOMIZE = PATCH_ON_IMPORT + '''
import fnmatch
import os
import signal
import time

_PATTERN = os.environ.get("PRUNEFLOW_TEST_KILL_AT")
_PAUSE = os.environ.get("PRUNEFLOW_TEST_PAUSE_AT")
_STATE = os.environ.get("PRUNEFLOW_TEST_HOOK_STATE", ".")


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
        where = os.path.abspath(os.fspath(target))
        if _PAUSE and fnmatch.fnmatch(where, _PAUSE):
            with open(os.path.join(_STATE, "paused.tmp"), "w") as handle:
                handle.write(str(os.getpid()))
            os.replace(os.path.join(_STATE, "paused.tmp"), os.path.join(_STATE, "paused"))
            while not os.path.exists(os.path.join(_STATE, "release")):
                time.sleep(0.05)
        if _PATTERN and fnmatch.fnmatch(where, _PATTERN):
            _cut_in_half(os.fspath(tmp))
            sys.stderr.write("kill_hook: SIGKILL while writing %s\\n" % target)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return swap_in(tmp, target)

    module._swap_in = killing_swap_in


if _PATTERN or _PAUSE:
    _patch_on_import("pruneflow.pipeline.atomic", _install)
'''


def kill_hook_env(folder: Path, pattern: str, pythonpath: str | None = None) -> dict[str, str]:
    """Env additions that SIGKILL whichever process writes an output matching `pattern`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    paths = [str(folder), *([pythonpath] if pythonpath else []), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), ENV_PATTERN: pattern}


def pause_hook_env(folder: Path, pattern: str, pythonpath: str | None = None) -> dict[str, str]:
    """Env additions that hold whichever process writes an output matching `pattern` until
    `folder/release` exists (it first writes `folder/paused`)."""
    env = kill_hook_env(folder, "", pythonpath)
    env.pop(ENV_PATTERN)
    return {**env, "PRUNEFLOW_TEST_PAUSE_AT": pattern, "PRUNEFLOW_TEST_HOOK_STATE": str(folder)}


def visible_entries(folder: Path) -> set[str]:
    """What a user (or Snakemake, or DVC) sees in a folder: names not starting with a dot."""
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every visible file under `path` (or `path` itself) with its bytes; hidden temporaries are left out."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    files = (p.relative_to(path) for p in sorted(path.rglob("*")) if p.is_file())
    return {str(p): (path / p).read_bytes() for p in files if not any(part.startswith(".") for part in p.parts)}
