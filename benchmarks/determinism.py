"""How far two runs with the same params and seeds drift apart on one device (the tolerance a GPU rerun is held to).

Scores every criterion twice from a fresh seed, prunes the dense model from each score set, and
compares: the largest absolute and relative score difference, whether the same groups are removed,
and the largest logit difference of the two pruned models on calibration text. On the CPU every
figure is 0 (tests/test_determinism.py checks bytes); on a GPU, kernel choice makes them non-zero and
this is where the tolerance is measured. Writes OUT.json and OUT.md.

    python benchmarks/determinism.py --samples 32 --criteria taylor_element1 flap mutual_information
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from pruneflow.checkpoint import load_pruned
from pruneflow.config import load_params
from pruneflow.errors import PruneflowError
from pruneflow.importance import ScoringInputs, get_criterion
from pruneflow.layout_search import layouts_to_try
from pruneflow.pipeline.atomic import write_json, write_text
from pruneflow.pruning import apply_pruning, plan_pruning
from pruneflow.runtime import resolve_device, resolve_dtype, seed_everything
from pruneflow.stages.calibrate import load_calibration


def score_twice(model, criterion, inputs: ScoringInputs, seed: int):
    runs = []
    for _ in range(2):
        seed_everything(seed)
        runs.append(criterion.score(model, inputs))
    return runs


def max_differences(first, second) -> tuple[float, float]:
    """Largest |a - b| over all group scores, and the same relative to the largest |a|."""
    pairs = list(zip(first.attention + first.ffn, second.attention + second.ffn, strict=True))
    absolute = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    scale = max(float(a.double().abs().max()) for a, _ in pairs) or 1.0
    return absolute, absolute / scale


def first_plan(model, scores, ratio: float, layers: list[int], params):
    """The plan of the first layout (attention_unit auto: in search order) that reaches `ratio`."""
    candidates = layouts_to_try(params.prune.structures, params.prune.attention_unit)
    for index, layout in enumerate(candidates):
        try:
            return plan_pruning(model, scores, ratio, layers, layout.structures, allocation=params.prune.allocation,
                                attention_unit=layout.attention_unit)
        except PruneflowError:
            if index == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


def compare_criterion(name: str, dense, params, ids, stats, device, dtype, ratio: float) -> dict[str, Any]:
    criterion = get_criterion(name, params.score)
    inputs = ScoringInputs(calibration_ids=ids, activations=stats if criterion.needs_activations else None,
                           micro_batch_size=params.score.micro_batch_size, seed=params.seed, device=device,
                           dtype=dtype)
    first, second = score_twice(dense, criterion, inputs, params.seed)
    absolute, relative = max_differences(first, second)
    layers = list(params.prune.layer_range(len(dense.model.layers)))
    plans, models = [], []
    for scores in (first, second):
        model = copy.deepcopy(dense).float().cpu()
        plan = first_plan(model, scores, ratio, layers, params)
        apply_pruning(model, plan)
        plans.append(plan)
        models.append(model.to(device=device, dtype=dtype))
    same_groups = (plans[0].removed_ffn_channels == plans[1].removed_ffn_channels
                   and plans[0].removed_attention_groups == plans[1].removed_attention_groups
                   and plans[0].removed_query_heads == plans[1].removed_query_heads)
    batch = ids[: min(4, len(ids))].to(device)
    with torch.inference_mode():
        logits = [m(batch).logits.float() for m in models]
    return {"criterion": name, "max_abs_score_diff": absolute, "max_rel_score_diff": relative,
            "same_groups_removed": same_groups,
            "max_abs_logit_diff": float((logits[0] - logits[1]).abs().max())}


def render(payload: dict[str, Any]) -> str:
    lines = ["# Run-to-run determinism (same params, same seeds)", "",
             f"Command: `{payload['command']}`  ",
             f"Device: {payload['device']}, {payload['dtype']}; {payload['samples']} calibration samples; "
             f"ratio {payload['ratio']}.", "",
             "| criterion | max abs score diff | max rel score diff | same groups removed | max abs logit diff |",
             "|---|---:|---:|---|---:|"]
    for row in payload["rows"]:
        lines.append(f"| {row['criterion']} | {row['max_abs_score_diff']:.3g} | {row['max_rel_score_diff']:.3g} | "
                     f"{'yes' if row['same_groups_removed'] else 'NO'} | {row['max_abs_logit_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("data/models/dense"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration/calibration.safetensors"))
    parser.add_argument("--activations", type=Path, default=Path("data/activations/activations.safetensors"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--criteria", nargs="+", default=["taylor_element1", "flap", "mutual_information"])
    parser.add_argument("--samples", type=int, default=None, help="first N calibration samples (default: all)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=None, help="default reports/benchmarks/determinism_<device>")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    params = load_params(args.params)
    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    ids = load_calibration(args.calibration)[: args.samples]
    stats = load_file(str(args.activations))
    dense = load_pruned(args.model, dtype=dtype, device=device)
    rows = []
    for name in args.criteria:
        rows.append(compare_criterion(name, dense, params, ids, stats, device, dtype, args.ratio))
        print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    payload = {"command": " ".join(["python", "benchmarks/determinism.py", *map(shlex.quote, argv or sys.argv[1:])]),
               "device": device_name, "dtype": str(dtype).removeprefix("torch."), "samples": len(ids),
               "ratio": args.ratio, "rows": rows}
    out = args.out or Path(f"reports/benchmarks/determinism_{device.type}")
    write_json(out.with_suffix(".json"), payload)
    write_text(out.with_suffix(".md"), render(payload))
    print(render(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
