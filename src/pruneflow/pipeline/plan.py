"""`python -m pruneflow.pipeline.plan`: check params.yaml and the inputs, and say what a run would do.

The same checks `snakemake` runs before any job (`preflight.check_plan`), then, per stage instance,
whether its output is fresh, stale (and why) or missing, from the records outputs carry. Also writes
or checks dvc.yaml, which is rendered from the stage table and params.yaml (`graph.render_dvc_yaml`).
Every problem is one line, `pruneflow plan: error: ...` (exit status 2), naming the key, the value
and what is allowed; nothing is written unless the params are valid.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import Params
from pruneflow.pipeline.graph import DVC_HEADER, render_dvc_yaml

STAGE = "plan"


def dvc_yaml_is_generated(path: Path) -> bool:
    return path.is_file() and path.read_text().startswith(DVC_HEADER.splitlines()[0])


def dvc_yaml_difference(current: str, rendered: str) -> str:
    """The stages whose definitions differ, in a few words ("" when none)."""
    import yaml

    try:
        old = (yaml.safe_load(current) or {}).get("stages", {})
    except yaml.YAMLError:
        return "dvc.yaml is not valid YAML"
    new = yaml.safe_load(rendered)["stages"]
    differing = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    if not differing:
        return ""
    details = []
    for name in differing[:3]:
        before, after = old.get(name) or {}, new.get(name) or {}
        body_before, body_after = before.get("do", before), after.get("do", after)
        added = [d for d in body_after.get("deps", []) if d not in body_before.get("deps", [])]
        removed = [d for d in body_before.get("deps", []) if d not in body_after.get("deps", [])]
        change = ", ".join([*(f"+{d}" for d in added[:2]), *(f"-{d}" for d in removed[:2])]) or "changed"
        details.append(f"{name}: {change}")
    return "; ".join(details)


def refresh_dvc_yaml(params: Params, root: Path) -> str:
    """Rewrite a pruneflow-generated dvc.yaml that no longer matches; returns what differed ("" if nothing)."""
    from pruneflow.pipeline.atomic import write_text

    path = Path(root) / "dvc.yaml"
    if not dvc_yaml_is_generated(path):
        return ""
    rendered = render_dvc_yaml(params, root)
    current = path.read_text()
    if current == rendered:
        return ""
    difference = dvc_yaml_difference(current, rendered) or "formatting"
    write_text(path, rendered)
    return difference


def main(argv: Sequence[str] | None = None) -> None:
    from pruneflow.config import load_params
    from pruneflow.errors import ConfigError
    from pruneflow.pipeline.preflight import check_plan
    from pruneflow.pipeline.records import verdicts
    from pruneflow.stages.cli import parser_for

    parser = parser_for(STAGE, __doc__.splitlines()[0])
    parser.prog = "python -m pruneflow.pipeline.plan"
    parser.add_argument("--write-dvc-yaml", action="store_true", help="render dvc.yaml from params.yaml")
    parser.add_argument("--check-dvc-yaml", action="store_true",
                        help="fail if dvc.yaml differs from its rendering (for CI)")
    parser.add_argument("--no-devices", action="store_true", help="skip the device check (planning elsewhere)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    root = Path.cwd()
    params = load_params(args.params)
    check_plan(params, root, devices=not args.no_devices)
    rendered = render_dvc_yaml(params, root)
    dvc_yaml = root / "dvc.yaml"
    if args.check_dvc_yaml:
        current = dvc_yaml.read_text() if dvc_yaml.is_file() else ""
        if current != rendered:
            diff = "".join(list(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                     "dvc.yaml", "rendered"))[:40])
            raise ConfigError(f"dvc.yaml is out of date ({dvc_yaml_difference(current, rendered) or 'formatting'}); "
                              f"allowed: the rendering of params.yaml: run `python -m pruneflow.pipeline.plan "
                              f"--write-dvc-yaml`\n{diff}")
    if args.write_dvc_yaml:
        from pruneflow.pipeline.atomic import write_text

        write_text(dvc_yaml, rendered)
    found = verdicts(params, root)
    if args.json:
        print(json.dumps([{"instance": v.instance, "output": v.output, "status": v.status, "reasons": v.reasons}
                          for v in found], indent=1))
        return
    for verdict in found:
        reasons = f"  ({'; '.join(verdict.reasons)})" if verdict.reasons else ""
        print(f"{verdict.status:8} {verdict.instance:45} {verdict.output}{reasons}")
    todo = sum(v.status != "fresh" for v in found)
    print(f"{todo} of {len(found)} stage instances would run", file=sys.stderr)


if __name__ == "__main__":
    from pruneflow.stages.cli import run_cli

    run_cli(STAGE, main)
