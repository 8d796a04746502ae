"""Record which files a stage process opens and which project modules it imports.

`trace_hook_env(folder, out_dir)` writes a `sitecustomize.py` into `folder` and returns the env
additions that make every Python process started with it (Snakemake jobs, DVC stages) write
`<out_dir>/<pid>.json` when it exits: its argv, the paths it opened for reading (Python's `open`
audit event, plus safetensors' `safe_open`, which opens files in Rust where no audit event fires)
and the files of the modules it imported. Production code has no switch for this.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .kill_hook import PATCH_ON_IMPORT

ENV_OUT = "PRUNEFLOW_TEST_TRACE_DIR"

_SITECUSTOMIZE = PATCH_ON_IMPORT + '''
import atexit
import json
import os

_OUT = os.environ.get("PRUNEFLOW_TEST_TRACE_DIR")
_opened = set()


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing:
            _opened.add(os.path.abspath(os.fsdecode(args[0])))


def _dump():
    modules = sorted({os.path.abspath(m.__file__) for m in list(sys.modules.values())
                      if getattr(m, "__file__", None)})
    record = {"argv": sys.argv, "cwd": os.getcwd(), "opened": sorted(_opened), "modules": modules}
    with open(os.path.join(_OUT, "%d.json" % os.getpid()), "w") as handle:
        json.dump(record, handle)


def _wrap_safetensors(module):
    original = module.safe_open

    def safe_open(filename, *args, **kwargs):
        _opened.add(os.path.abspath(os.fsdecode(filename)))
        return original(filename, *args, **kwargs)

    module.safe_open = safe_open


if _OUT and "pruneflow.stages." in " ".join(getattr(sys, "orig_argv", [])):
    sys.addaudithook(_audit)
    _patch_on_import("safetensors", _wrap_safetensors)
    atexit.register(_dump)
'''


def trace_hook_env(folder: Path, out_dir: Path, pythonpath: str | None = None) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    paths = [str(folder), *([pythonpath] if pythonpath else []), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), ENV_OUT: str(out_dir)}


def read_traces(out_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out_dir.glob("*.json"))]
