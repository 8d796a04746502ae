"""Reference pruner: Torch-Pruning's LLM recipe on the same model, calibration ids and parameter count.

What a user would pick instead of pruneflow is Torch-Pruning's `examples/LLMs/prune_llm.py`:
`tp.pruner.BasePruner` with `num_heads` for the q/k/v projections, `prune_num_heads=True`,
`prune_head_dims=False`, `head_pruning_ratio == pruning_ratio`, `round_to=4`, local (per layer)
ranking and `ignored_layers=[lm_head]`. Its importance is `GroupMagnitudeImportance(p=2)`; the Taylor
variants use `GroupTaylorImportance` with gradients of the next-token loss on OUR calibration ids.

Torch-Pruning 1.6.1 hangs on GQA decoders (Torch-Pruning issue #527): building the pruning group of
a q/k/v projection never ends. So every setting runs in its own child process under a time limit,
and a hang, a crash or a success is a result: `OUT/<setting>/result.json` records the status ("ok",
"timeout", "error"), the last stage the child reported, where it hung (its Python stack) or the
traceback, the seconds, and the parameter counts. Besides the recipe the settings a user would try
next are here too (see SETTINGS): eager attention, Linear-only roots, query heads only, and the
MLP-only settings that leave the attention alone.

Same conditions as pruneflow's pruner:
- only decoder layers [layer_start, layer_end) are pruned (negative end counts from the end; the
  others, and lm_head, are in `ignored_layers`). The residual width is never pruned: its group holds
  ignored layers, so Torch-Pruning skips it (prune_llm.py without a layer range would prune it);
- the pruning ratio is solved so that the pruned model has `--target-params` parameters (unique
  parameters, tied embeddings once) as closely as the setting's granularity allows: the parameter
  count after pruning is a step function of the ratio that mirrors Torch-Pruning's own rounding
  (`int(n * (1 - r))`, `round_to`, whole query heads per KV group); the achieved count and the
  relative gap are measured on the pruned model and recorded. Head settings keep the head count of
  the tied solution (head_pruning_ratio = pruning_ratio) and re-solve pruning_ratio alone (see
  solve_ratio);
- a pruned model is saved with pruneflow's checkpoint format (per-layer widths in config.json), the
  dense model's tokenizer is copied next to it, and `pruneflow.load_pruned` must reload it to the
  same logits (`reload_max_abs_diff`). Nothing is evaluated here.

    python benchmarks/torch_pruning_reference.py --model data/models/dense \\
        --calibration data/calibration/calibration.safetensors --target-params N \\
        --setting taylor_heads_mlp [--setting ... | --setting all] --out benchmarks/out/torch_pruning \\
        --time-limit 600 [--layer-start 4 --layer-end -2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pruneflow.pipeline.atomic import write_json

TORCH_PRUNING_PIN = "torch-pruning==1.6.1"
DEFAULT_TIME_LIMIT_S = 600.0
STATUS_FILE = "status.json"  # the child's progress, rewritten at every stage
CHILD_RESULT_FILE = "child_result.json"  # the child's measurements when it got to the end
LOG_FILE = "child.log"  # the child's stdout + stderr (tracebacks, faulthandler stacks)
RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
RATIO_GRID = 10_000  # pruning ratios tried when solving for the target: i / RATIO_GRID


@dataclass(frozen=True)
class Setting:
    """One way of running Torch-Pruning; every field maps onto a BasePruner argument."""

    description: str
    importance: str  # "taylor" (GroupTaylorImportance) | "magnitude" (GroupMagnitudeImportance(p=2))
    heads: str  # "qkv": num_heads for q/k/v (the recipe) | "q": query heads only, k/v ignored | "none"
    global_pruning: bool = False
    isomorphic: bool = False
    round_to: int | None = 4
    attn_implementation: str | None = None  # None: the model's default (sdpa)
    linear_roots_only: bool = False  # root_module_types=[nn.Linear] instead of conv/linear/lstm


SETTINGS: dict[str, Setting] = {
    "taylor_heads_mlp": Setting(
        "prune_llm.py recipe (BasePruner, num_heads for q/k/v, prune_num_heads=True, prune_head_dims=False, "
        "round_to=4, local ranking, head_pruning_ratio of the tied solution, see solve_ratio) with "
        "GroupTaylorImportance from the calibration loss gradients",
        importance="taylor", heads="qkv"),
    "magnitude_heads_mlp": Setting(
        "prune_llm.py recipe verbatim: GroupMagnitudeImportance(p=2, group_reduction='mean'), no data",
        importance="magnitude", heads="qkv"),
    "taylor_heads_mlp_eager": Setting(
        "taylor_heads_mlp with attn_implementation='eager' (explicit repeat_kv / matmuls instead of SDPA) "
        "for the tracing",
        importance="taylor", heads="qkv", attn_implementation="eager"),
    "taylor_heads_mlp_linear_roots": Setting(
        "taylor_heads_mlp with root_module_types=[nn.Linear]",
        importance="taylor", heads="qkv", linear_roots_only=True),
    "taylor_qheads_mlp": Setting(
        "query heads only: num_heads for q_proj, k_proj/v_proj in ignored_layers (KV heads kept); "
        "otherwise taylor_heads_mlp",
        importance="taylor", heads="q"),
    "taylor_mlp_only": Setting(
        "heads left alone: every self_attn in ignored_layers, no num_heads; MLP channels pruned with "
        "the same ratio in every layer (local ranking), round_to=4, GroupTaylorImportance",
        importance="taylor", heads="none"),
    "magnitude_mlp_only": Setting(
        "taylor_mlp_only with GroupMagnitudeImportance(p=2, group_reduction='mean')",
        importance="magnitude", heads="none"),
    "taylor_mlp_only_global": Setting(
        "taylor_mlp_only with global_pruning=True (one ranking over all pruned layers' MLP channels; "
        "widths differ per layer); round_to=None so the total is exact",
        importance="taylor", heads="none", global_pruning=True, round_to=None),
    "taylor_mlp_only_isomorphic": Setting(
        "taylor_mlp_only with global_pruning=True, isomorphic=True (ranking within structurally identical "
        "groups: here all MLP groups, i.e. the same scope as global); round_to=None",
        importance="taylor", heads="none", global_pruning=True, isomorphic=True, round_to=None),
}


# ----------------------------------------------------------------------------------------------------
# Planning: the parameter count after pruning as a function of the ratio, as Torch-Pruning rounds it
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs: unique parameter count, widths, and the parameters one unit carries."""

    params: int
    hidden_size: int
    head_dim: int
    num_layers: int
    pruned_layers: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]  # per layer
    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp_channel_params: int  # gate row + up row + down column (+ gate/up biases)
    query_head_params: int  # q rows (+ bias) + o_proj columns of one head
    kv_head_params: int  # k rows + v rows (+ biases) of one head


def resolve_layer_range(num_layers: int, layer_start: int, layer_end: int) -> tuple[int, int]:
    """Python-style [start, end) against the model's depth, like pruneflow's prune.layer_start/end."""
    start = layer_start + num_layers if layer_start < 0 else layer_start
    end = layer_end + num_layers if layer_end < 0 else layer_end
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layer_start={layer_start}, layer_end={layer_end} select no layers of a model with "
                         f"{num_layers} layers; allowed: -{num_layers} <= start < end <= {num_layers}")
    return start, end


def model_facts(model, layer_start: int, layer_end: int) -> ModelFacts:
    from pruneflow.architectures import count_parameters, decoder_layers, head_dim

    layers = decoder_layers(model)
    start, end = resolve_layer_range(len(layers), layer_start, layer_end)
    size = head_dim(model)
    first = layers[start]
    attn, mlp = first.self_attn, first.mlp
    hidden = attn.q_proj.in_features
    q_bias = size if attn.q_proj.bias is not None else 0
    kv_bias = size if attn.k_proj.bias is not None else 0
    mlp_bias = (mlp.gate_proj.bias is not None) + (mlp.up_proj.bias is not None)
    return ModelFacts(
        params=count_parameters(model),
        hidden_size=hidden,
        head_dim=size,
        num_layers=len(layers),
        pruned_layers=tuple(range(start, end)),
        intermediate_sizes=tuple(layer.mlp.gate_proj.out_features for layer in layers),
        query_heads=tuple(layer.self_attn.q_proj.out_features // size for layer in layers),
        kv_heads=tuple(layer.self_attn.k_proj.out_features // size for layer in layers),
        mlp_channel_params=3 * hidden + mlp_bias,
        query_head_params=2 * size * hidden + q_bias,
        kv_head_params=2 * (size * hidden + kv_bias),
    )


def _local_remaining(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels a layer keeps under local ranking (BasePruner._prune, incl. its round_to rule)."""
    n_pruned = channels - int(channels * (1 - ratio))
    if n_pruned <= 0:
        return channels
    remaining = channels - n_pruned
    if round_to:
        remaining -= remaining % round_to
    return max(remaining, 0)


def _query_heads_removed(query_heads: int, kv_heads: int, ratio: float) -> int:
    """Query heads one layer loses under local head pruning (BasePruner._prune, GQA branch)."""
    if ratio <= 0:
        return 0
    n_removed = math.ceil(ratio * query_heads)
    if query_heads != kv_heads:  # GQA: the same number from every KV group, KV heads kept
        n_removed = kv_heads * math.ceil(n_removed / kv_heads)
    return min(n_removed, query_heads)


def planned_layout(facts: ModelFacts, setting: Setting, ratio: float,
                   head_ratio: float | None = None) -> dict[str, Any]:
    """Expected widths and parameter count for pruning_ratio=`ratio`, head_pruning_ratio=`head_ratio`
    (default: `ratio`, as prune_llm.py ties them)."""
    head_ratio = ratio if head_ratio is None else head_ratio
    removed = 0
    inter = list(facts.intermediate_sizes)
    heads = list(facts.query_heads)
    kv = list(facts.kv_heads)
    if setting.global_pruning:
        if setting.heads != "none" or setting.round_to:
            raise ValueError("the plan covers global pruning only for MLP channels without round_to")
        total = sum(facts.intermediate_sizes[i] for i in facts.pruned_layers)
        n_pruned = max(total - int(total * (1 - ratio)), 0)
        removed += n_pruned * facts.mlp_channel_params
        mlp_channels_after = total - n_pruned  # spread over layers by the importance ranking
        for i in facts.pruned_layers:
            inter[i] = None
    else:
        for i in facts.pruned_layers:
            inter[i] = _local_remaining(facts.intermediate_sizes[i], ratio, setting.round_to)
            removed += (facts.intermediate_sizes[i] - inter[i]) * facts.mlp_channel_params
        mlp_channels_after = sum(inter[i] for i in facts.pruned_layers)
    if setting.heads != "none":
        for i in facts.pruned_layers:
            mha = heads[i] == kv[i]
            # query heads only (k/v ignored) cannot go without their KV heads unless there is GQA
            n = 0 if setting.heads == "q" and mha else _query_heads_removed(heads[i], kv[i], head_ratio)
            heads[i] -= n
            removed += n * facts.query_head_params
            if mha:  # plain MHA: K and V heads go with the query heads
                kv[i] -= n
                removed += n * facts.kv_head_params
    return {
        "pruning_ratio": ratio,
        "head_pruning_ratio": head_ratio if setting.heads != "none" else 0.0,
        "params": facts.params - removed,
        "mlp_channels_after": mlp_channels_after,
        "intermediate_sizes": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
    }


def _closest(facts: ModelFacts, setting: Setting, target_params: int, candidates, head_ratio=None):
    best_key, best = None, []
    for ratio in sorted(candidates):
        params = planned_layout(facts, setting, ratio, head_ratio)["params"]
        key = (abs(params - target_params), params < target_params)
        if best_key is None or key < best_key:
            best_key, best = key, [ratio]
        elif key == best_key:
            best.append(ratio)
    return best


def solve_ratio(facts: ModelFacts, setting: Setting, target_params: int) -> dict[str, Any]:
    """The ratios whose planned parameter count is closest to `target_params`.

    The count is a step function of the ratio. Candidates: a grid of RATIO_GRID ratios plus, for
    every channel count n the setting ranks over (a layer's width, or all pruned layers' widths for
    global ranking), the ratios (k + 0.5) / n that remove exactly k + 1 of n channels. Among the
    candidates of the best step the middle one is taken, so float rounding at a step's edge cannot
    move the result.

    Head settings: first the tied solution (head_pruning_ratio = pruning_ratio, prune_llm.py); its
    head ratio is kept (same number of heads removed) and pruning_ratio (the MLP channels) is solved
    again on its own, because a whole query head per KV group is a coarse step (on SmolLM2 the tied
    solution misses a 20% target by +0.34%).
    """
    counts = set(facts.intermediate_sizes[i] for i in facts.pruned_layers)
    if setting.global_pruning:
        counts.add(sum(facts.intermediate_sizes[i] for i in facts.pruned_layers))
    candidates = {i / RATIO_GRID for i in range(RATIO_GRID)}
    for n in counts:
        candidates.update((k + 0.5) / n for k in range(n))
    best = _closest(facts, setting, target_params, candidates)
    tied = planned_layout(facts, setting, best[len(best) // 2])
    tied_gap = (tied["params"] - target_params) / target_params
    head_ratio = None
    if setting.heads != "none":
        head_ratio = tied["head_pruning_ratio"]
        best = _closest(facts, setting, target_params, candidates, head_ratio)
    plan = planned_layout(facts, setting, best[len(best) // 2], head_ratio)
    plan["ratio_interval"] = [best[0], best[-1]]
    plan["planned_relative_gap"] = (plan["params"] - target_params) / target_params
    if setting.heads != "none":
        plan["tied_ratio_plan"] = {"ratio": tied["pruning_ratio"], "params": tied["params"],
                                   "relative_gap": tied_gap}
    return plan


# ----------------------------------------------------------------------------------------------------
# Child: one setting, in its own process
# ----------------------------------------------------------------------------------------------------


class Progress:
    """The child's stage, rewritten atomically so that the parent can read it after a kill."""

    def __init__(self, path: Path):
        self.path = path
        self.started = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.stage = "started"
        self.detail = ""

    def __call__(self, stage: str, detail: str = "", *, record: bool = True, **extra: Any) -> None:
        elapsed = round(time.perf_counter() - self.started, 3)
        self.stage, self.detail = stage, detail
        self.extra.update(extra)
        if record:
            self.history.append({"stage": stage, "detail": detail, "elapsed_s": elapsed})
        write_json(self.path, {"stage": stage, "detail": detail, "elapsed_s": elapsed, "pid": os.getpid(),
                               "history": self.history, **self.extra})
        print(f"[{elapsed:8.1f}s] {stage}{': ' + detail if detail else ''}", flush=True)


def _watch_grouping(tp, model, progress: Progress, every_s: float = 10.0) -> None:
    """Report every new root Torch-Pruning builds a pruning group for (where the hang happens).

    A background thread also reports, every `every_s` seconds, how many dependencies the group being
    built holds: on the GQA hang it grows without bound although the graph has a few hundred nodes.
    """
    import threading

    names = {module: name for name, module in model.named_modules()}
    graph_cls, group_cls = tp.dependency.DependencyGraph, tp.dependency.group.Group
    build, get_group, add_dep = graph_cls.build_dependency, graph_cls.get_pruning_group, group_cls.add_dep
    state: dict[str, Any] = {"groups": 0, "last": None, "root": "", "deps": 0, "started": 0.0, "nodes": None}

    def build_dependency(self, *args, **kwargs):
        progress("tracing graph", "DependencyGraph.build_dependency")
        out = build(self, *args, **kwargs)
        state["nodes"] = len(self.module2node)
        progress("grouping", f"DependencyGraph.get_all_groups over {state['nodes']} graph nodes")
        return out

    def get_pruning_group(self, module, pruning_fn, idxs):
        state["groups"] += 1
        key = (module, getattr(pruning_fn, "__name__", str(pruning_fn)))
        state["deps"], state["started"] = 0, time.perf_counter()
        if key != state["last"]:
            state["last"] = key
            state["root"] = (f"pruning group #{state['groups']} rooted at {names.get(module, module)} "
                             f"({key[1]}, {len(idxs)} indices)")
            progress(progress.stage, state["root"], record=False)
        return get_group(self, module, pruning_fn, idxs)

    def counting_add_dep(self, dep, idxs):
        state["deps"] += 1
        return add_dep(self, dep, idxs)

    def report() -> None:
        while True:
            time.sleep(every_s)
            if progress.stage in ("grouping", "pruning") and state["root"]:
                seconds = time.perf_counter() - state["started"]
                progress(progress.stage, f"{state['root']}: {state['deps']} dependencies added in {seconds:.0f} s "
                         f"(graph: {state['nodes']} nodes)", record=False, group_dependencies=state["deps"])

    graph_cls.build_dependency = build_dependency
    graph_cls.get_pruning_group = get_pruning_group
    group_cls.add_dep = counting_add_dep
    threading.Thread(target=report, daemon=True).start()


def _importance(tp, setting: Setting):
    """The importance class under its name in the installed version (renamed across 1.x releases)."""
    if setting.importance == "taylor":
        cls = getattr(tp.importance, "GroupTaylorImportance", None) or tp.importance.TaylorImportance
        return cls(group_reduction="mean")
    if setting.importance == "magnitude":
        cls = (getattr(tp.importance, "GroupMagnitudeImportance", None)
               or getattr(tp.importance, "GroupNormImportance", None) or tp.importance.MagnitudeImportance)
        return cls(p=2, group_reduction="mean")
    raise ValueError(f"importance={setting.importance!r}; allowed: taylor, magnitude")


def _pruner_class(tp):
    """BasePruner (1.5+), MetaPruner in older releases."""
    return getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner


def _taylor_gradients(model, ids, micro_batch: int = 2) -> float:
    """Accumulate d(mean next-token loss over all calibration samples)/d(weights) into .grad."""
    import torch

    model.zero_grad(set_to_none=True)
    total = 0.0
    with torch.enable_grad():
        for begin in range(0, len(ids), micro_batch):
            batch = ids[begin:begin + micro_batch]
            loss = model(input_ids=batch, labels=batch).loss * (len(batch) / len(ids))
            loss.backward()
            total += float(loss.detach())
    return total


def _fix_attributes(model) -> list[str]:
    """Make the modules' head/width bookkeeping match their new weights; return what changed."""
    from pruneflow.architectures import decoder_layers, head_dim, layer_shape, sync_layer_attributes

    size = head_dim(model)
    names = ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim")
    changes = []
    for index, layer in enumerate(decoder_layers(model)):
        shape = layer_shape(layer, size)
        if shape.num_key_value_heads == 0 or shape.num_attention_heads % shape.num_key_value_heads:
            raise RuntimeError(f"layer {index}: {shape.num_attention_heads} query heads cannot share "
                               f"{shape.num_key_value_heads} KV heads evenly")
        before = {n: getattr(layer.self_attn, n) for n in names if hasattr(layer.self_attn, n)}
        before["mlp.intermediate_size"] = getattr(layer.mlp, "intermediate_size", None)
        sync_layer_attributes(layer, shape)
        after = {n: getattr(layer.self_attn, n) for n in names if hasattr(layer.self_attn, n)}
        after["mlp.intermediate_size"] = getattr(layer.mlp, "intermediate_size", None)
        for name, old in before.items():
            if after[name] != old:
                changes.append(f"layer {index}: {name} {old} -> {after[name]}")
    return changes


def _describe_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The BasePruner arguments as JSON (modules by count, objects by class and settings)."""
    described: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, bool | int | float | str | type(None)):
            described[key] = value
        elif key == "importance":
            described[key] = f"{type(value).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(value).items() if k != 'target_types')})"
        elif key == "output_transform":
            described[key] = "lambda out: out.logits"
        elif key in ("ignored_layers", "num_heads"):
            described[key] = f"{len(value)} modules"
        elif key == "root_module_types":
            described[key] = [getattr(t, "__name__", str(t)) for t in value]
        else:
            described[key] = repr(value)[:200]
    return described


def run_child(spec_path: Path) -> None:
    """Load, plan, build the Torch-Pruning pruner, score, prune, fix, save, reload-check."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for the stack on timeout
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    progress = Progress(out_dir / STATUS_FILE)
    progress("started", f"setting {spec['setting']}")
    setting = Setting(**spec["setting_fields"])

    import torch
    import torch_pruning as tp
    from torch import nn

    from pruneflow.architectures import count_parameters, decoder_layers, layer_shapes
    from pruneflow.checkpoint import load_pruned, save_pruned
    from pruneflow.stages.calibrate import load_calibration

    torch.manual_seed(0)
    model = load_pruned(spec["model_dir"], dtype=torch.float32, device="cpu")
    if setting.attn_implementation:
        model.set_attn_implementation(setting.attn_implementation)
    ids = load_calibration(Path(spec["calibration_path"])).long()
    facts = model_facts(model, spec["layer_start"], spec["layer_end"])
    progress("loaded", f"{facts.params} parameters, {facts.num_layers} layers, calibration {list(ids.shape)}",
             params_before=facts.params, pruned_layers=list(facts.pruned_layers))
    plan = solve_ratio(facts, setting, spec["target_params"])
    progress("planned", f"pruning_ratio={plan['pruning_ratio']:.4f} -> {plan['params']} planned parameters",
             plan=plan)

    layers = decoder_layers(model)
    pruned = set(facts.pruned_layers)
    ignored: list[nn.Module] = [model.lm_head] + [layer for i, layer in enumerate(layers) if i not in pruned]
    num_heads: dict[nn.Module, int] = {}
    for i in facts.pruned_layers:
        attn = layers[i].self_attn
        if setting.heads == "qkv":
            num_heads[attn.q_proj] = facts.query_heads[i]
            num_heads[attn.k_proj] = facts.kv_heads[i]
            num_heads[attn.v_proj] = facts.kv_heads[i]
        elif setting.heads == "q":
            num_heads[attn.q_proj] = facts.query_heads[i]
            ignored += [attn.k_proj, attn.v_proj]
        else:
            ignored.append(attn)
    kwargs: dict[str, Any] = dict(
        importance=_importance(tp, setting),
        global_pruning=setting.global_pruning,
        isomorphic=setting.isomorphic,
        output_transform=lambda out: out.logits,
        pruning_ratio=plan["pruning_ratio"],
        ignored_layers=ignored,
        round_to=setting.round_to,
    )
    if setting.heads != "none":
        kwargs.update(num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=plan["head_pruning_ratio"])
    if setting.linear_roots_only:
        kwargs["root_module_types"] = [nn.Linear]

    _watch_grouping(tp, model, progress)
    pruner = _pruner_class(tp)(model, example_inputs=ids[:1], **kwargs)
    progress("graph built", f"{len(pruner.DG.module2node)} graph nodes")

    if setting.importance == "taylor":
        loss = _taylor_gradients(model, ids)
        progress("importance computed", f"gradients of the mean next-token loss {loss:.4f} on {len(ids)} samples",
                 calibration_loss=loss)
    else:
        progress("importance computed", "magnitude: weights only, scored inside pruner.step()")

    progress("pruning", "pruner.step(interactive=True)")
    groups = 0
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            group.prune()
            groups += 1
    del pruner
    model.zero_grad(set_to_none=True)
    for param in model.parameters():
        param.requires_grad_(False)
    if model.lm_head.in_features != facts.hidden_size:
        raise RuntimeError(f"Torch-Pruning pruned the residual width {facts.hidden_size} -> "
                           f"{model.lm_head.in_features}; pruneflow never does")
    params_after = count_parameters(model)
    progress("pruned", f"{groups} groups pruned, {params_after} parameters", groups_pruned=groups)

    changes = _fix_attributes(model)
    shapes = [s.to_dict() for s in layer_shapes(model)]
    probe = ids[: min(2, len(ids))]
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the pruned model gives non-finite logits")
    progress("attributes fixed", f"{len(changes)} attribute changes; forward ok")

    model_dir = out_dir / "model"
    from pruneflow.pipeline.atomic import atomic_dir

    with atomic_dir(model_dir) as tmp:
        save_pruned(model, tmp)
        for name in TOKENIZER_FILES:
            source = Path(spec["model_dir"]) / name
            if source.is_file():
                shutil.copy2(source, tmp / name)
    progress("saved", str(model_dir))

    reloaded = load_pruned(model_dir, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        diff = float((reloaded(input_ids=probe).logits - logits).abs().max())
    reload_params = count_parameters(reloaded)
    if reload_params != params_after:
        raise RuntimeError(f"reloaded model has {reload_params} parameters, pruned one {params_after}")
    progress("reload checked", f"max |logits difference| {diff:.3g}")
    write_json(out_dir / CHILD_RESULT_FILE, {
        "params_after": params_after,
        "layer_shapes": shapes,
        "groups_pruned": groups,
        "attribute_fixes": changes,
        "reload_max_abs_diff": diff,
        "model_dir": str(model_dir),
        "pruner_kwargs": _describe_kwargs(kwargs),
    })


# ----------------------------------------------------------------------------------------------------
# Parent: run a setting under a time limit and record what happened
# ----------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch-pruning", "torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in text if "Loading weights" not in line][-lines:]


def _hang_stack(log_lines: list[str]) -> list[str]:
    """The main thread's frames from the faulthandler dump the parent asked for on timeout."""
    starts = [i for i, line in enumerate(log_lines) if "most recent call first" in line]
    if not starts:
        return []
    frames = []
    for line in log_lines[starts[-1] + 1:]:
        if not line.strip().startswith("File"):
            break
        frames.append(line.strip())
    return frames


def _stop(process: subprocess.Popen) -> None:
    """Ask the child (a session leader) for its stack, then kill its whole process group."""
    try:
        os.kill(process.pid, signal.SIGUSR1)
        time.sleep(2.0)
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_setting(model_dir, calibration_path, target_params, setting, out_dir, time_limit_s=DEFAULT_TIME_LIMIT_S,
                layer_start=4, layer_end=-2) -> dict:
    """Run one Torch-Pruning setting in a child process; write and return OUT/<setting>/result.json.

    `setting` is a key of SETTINGS; `out_dir` is OUT (the setting's folder is made inside). Status is
    "ok" (pruned model saved in OUT/<setting>/model and reloaded to the same logits), "timeout" (killed
    after `time_limit_s`; `stage` is the last one the child reported, `hang_stack` where it was) or
    "error" (`error` holds the end of the child's traceback).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}; allowed: {', '.join(SETTINGS)}")
    config = SETTINGS[setting]
    setting_dir = Path(out_dir) / setting
    setting_dir.mkdir(parents=True, exist_ok=True)
    for name in (STATUS_FILE, CHILD_RESULT_FILE, LOG_FILE, RESULT_FILE):
        (setting_dir / name).unlink(missing_ok=True)
    if (setting_dir / "model").exists():
        shutil.rmtree(setting_dir / "model")
    spec = {
        "model_dir": str(Path(model_dir).resolve()),
        "calibration_path": str(Path(calibration_path).resolve()),
        "target_params": int(target_params),
        "setting": setting,
        "setting_fields": asdict(config),
        "out_dir": str(setting_dir.resolve()),
        "layer_start": int(layer_start),
        "layer_end": int(layer_end),
    }
    write_json(setting_dir / SPEC_FILE, spec)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str((setting_dir / SPEC_FILE).resolve())]
    started = time.perf_counter()
    with open(setting_dir / LOG_FILE, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        try:
            returncode = process.wait(timeout=time_limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _stop(process)
            returncode, timed_out = None, True
    seconds = time.perf_counter() - started

    status = _read_json(setting_dir / STATUS_FILE)
    child = _read_json(setting_dir / CHILD_RESULT_FILE)
    log_tail = _tail(setting_dir / LOG_FILE)
    if timed_out:
        outcome = "timeout"
    elif returncode == 0 and child:
        outcome = "ok"
    else:
        outcome = "error"
    plan = status.get("plan", {})
    params_after = child.get("params_after")
    result: dict[str, Any] = {
        "setting": setting,
        "description": config.description,
        "setting_fields": asdict(config),
        "torch_pruning_version": _versions()["torch-pruning"],
        "versions": _versions(),
        "status": outcome,
        "stage": status.get("stage", "not started"),
        "stage_detail": status.get("detail", ""),
        "stages": status.get("history", []),
        "seconds": round(seconds, 2),
        "time_limit_s": time_limit_s,
        "returncode": returncode,
        "params_before": status.get("params_before"),
        "target_params": int(target_params),
        "params_after": params_after,
        "relative_gap": None if params_after is None else (params_after - target_params) / target_params,
        "pruning_ratio": plan.get("pruning_ratio"),
        "head_pruning_ratio": plan.get("head_pruning_ratio"),
        "planned_params": plan.get("params"),
        "planned_relative_gap": plan.get("planned_relative_gap"),
        "planned_layout": {k: plan.get(k) for k in ("intermediate_sizes", "num_attention_heads",
                                                    "num_key_value_heads", "mlp_channels_after")},
        "layer_range": [layer_start, layer_end],
        "pruned_layers": status.get("pruned_layers"),
        "layer_shapes": child.get("layer_shapes"),
        "groups_pruned": child.get("groups_pruned"),
        "attribute_fixes": child.get("attribute_fixes"),
        "reload_max_abs_diff": child.get("reload_max_abs_diff"),
        "model_dir": child.get("model_dir"),
        "pruner_kwargs": child.get("pruner_kwargs"),
        "calibration_loss": status.get("calibration_loss"),
        "error": log_tail[-25:] if outcome == "error" else None,
        "hang_stack": _hang_stack(log_tail) if outcome == "timeout" else None,
        "log": str(setting_dir / LOG_FILE),
        "command_line": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "child_command": " ".join(shlex.quote(a) for a in command),
    }
    write_json(setting_dir / RESULT_FILE, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="settings:\n" + "\n".join(f"  {k}: {v.description}"
                                                                      for k, v in SETTINGS.items()))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help="dense Hugging Face model folder")
    parser.add_argument("--calibration", type=Path, help="pruneflow calibration .safetensors (input_ids)")
    parser.add_argument("--target-params", type=int, help="parameter count the pruned model must reach")
    parser.add_argument("--setting", action="append", choices=[*SETTINGS, "all"],
                        help="setting to run (repeatable; 'all' runs every one)")
    parser.add_argument("--out", type=Path, help="output folder (one subfolder per setting)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="seconds per setting")
    parser.add_argument("--layer-start", type=int, default=4)
    parser.add_argument("--layer-end", type=int, default=-2, help="exclusive; negative counts from the end "
                        "(-2 = 28 of 30 layers)")
    args = parser.parse_args(argv)
    if args.child is not None:
        try:
            run_child(args.child)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            return 1
        return 0
    missing = [name for name in ("model", "calibration", "target_params", "setting", "out")
               if getattr(args, name) is None]
    if missing:
        parser.error("missing: " + ", ".join("--" + name.replace("_", "-") for name in missing))
    settings = list(SETTINGS) if "all" in args.setting else list(dict.fromkeys(args.setting))
    for name in settings:
        result = run_setting(args.model, args.calibration, args.target_params, name, args.out, args.time_limit,
                             args.layer_start, args.layer_end)
        gap = "" if result["relative_gap"] is None else f" gap {result['relative_gap']:+.4%}"
        print(f"{name}: {result['status']} after {result['seconds']:.1f} s at stage {result['stage']!r}"
              f" params {result['params_after']}{gap}", flush=True)
    write_summary(args.out)
    return 0


def write_summary(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """OUT/summary.json: one row per OUT/<setting>/result.json present (whichever run wrote it)."""
    keys = ("setting", "status", "stage", "stage_detail", "seconds", "params_before", "target_params",
            "params_after", "relative_gap", "pruning_ratio", "head_pruning_ratio", "reload_max_abs_diff",
            "model_dir")
    rows = []
    for name in SETTINGS:
        result = _read_json(Path(out_dir) / name / RESULT_FILE)
        if result:
            rows.append({k: result.get(k) for k in keys})
    write_json(Path(out_dir) / "summary.json", rows)
    return rows


if __name__ == "__main__":
    sys.exit(main())
