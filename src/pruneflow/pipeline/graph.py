"""The pipeline in one table: what each stage runs, reads, writes and which params it reads.

Both engines are built from `STAGES`: the Snakefile's rules take their inputs, outputs and commands
from it (workflow/rules/*.smk), and dvc.yaml is rendered from it (`render_dvc_yaml`). So the two
cannot drift apart: the same command, the same upstream outputs, the same data files (resolved from
the params, the `laptop:` preset included, wherever they live), the same source files (each stage's
import closure, `code_deps`) and the same params keys.

Paths are templates with `{criterion}` / `{ratio}` placeholders; `{criterion}` ranges over
`grid.criteria` (or `grid.recovered_criteria`), `{ratio}` over `grid.ratios`, named by
`config.format_ratio` (DVC's spelling). Arguments name paths by role: `{input.<role>}`,
`{output.<role>}`. An input is "<stage>.<output role>" of the upstream output it reads; when the
upstream stage has placeholders this stage lacks, the input is every instance of it (report reads
all metrics) and DVC depends on the folder in `dvc_inputs` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pruneflow.config import Params, format_ratio
from pruneflow.sources import gguf_export_applies

PARAMS_FILE = "params.yaml"
DATA_DIR = "data/raw"
STATE_DIR = ".pruneflow"
GPU_SLOT_PREFIX = "python -m pruneflow.pipeline.gpu_slots -- "


@dataclass(frozen=True)
class Output:
    """One output of a stage and how DVC records it."""

    path: str
    kind: Literal["file", "dir"] = "file"
    dvc: Literal["outs", "metrics", "plots"] = "outs"
    cache: bool = True
    plot: Mapping[str, str] | None = None  # DVC plot properties (x, y) for `dvc: plots`


@dataclass(frozen=True)
class Stage:
    """A stage: one CLI module (`pruneflow.stages.<module>`) run once per grid instance."""

    name: str
    module: str
    args: tuple[str, ...]
    outputs: Mapping[str, Output]
    params: tuple[str, ...]  # params.yaml keys the stage reads (DVC `params:`)
    inputs: Mapping[str, str] = field(default_factory=dict)
    criteria: Literal["criteria", "recovered_criteria", "servable_criteria"] | None = None
    ratios: bool = False
    data: Callable[[Params, Path], list[str]] = lambda params, root: []
    dvc_inputs: Mapping[str, str] = field(default_factory=dict)
    gpu: bool = False
    record_output: str | None = None  # the output role carrying the stage's record (default: the first)

    @property
    def placeholders(self) -> tuple[str, ...]:
        return (("criterion",) if self.criteria else ()) + (("ratio",) if self.ratios else ())

    @property
    def primary(self) -> Output:
        """The output that carries the stage's record (`pipeline.records`)."""
        return self.outputs[self.record_output] if self.record_output else next(iter(self.outputs.values()))


def project_path(path: str | Path, root: Path) -> str:
    """A path as both engines name it: relative to the project when inside it, else absolute."""
    absolute = Path(os.path.abspath(Path(root) / Path(path).expanduser()))
    try:
        return absolute.relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return absolute.as_posix()


# ------------------------------------------------------------------- data files, resolved from the params


def _model_source(params: Params, root: Path) -> list[str]:
    from pruneflow.sources import resolve_source

    source = resolve_source(params.model.source, base_dir=root)
    # the embedded GGUF and hub downloads belong to the installed environment (pinned package, hub
    # revision: both in the params), like the libraries; only a local folder is a project input
    return [project_path(source.location, root)] if source.kind == "local" else []


def _calibration_source(params: Params, root: Path) -> list[str]:
    return [project_path(params.calibration.source, root)]


def _recovery_data(params: Params, root: Path) -> list[str]:
    return sorted({project_path(path, root) for path in params.recover.data})


def evaluation_files(params: Params, data_dir: str = DATA_DIR, root: str | Path = ".") -> list[str]:
    """The perplexity texts and built-in zero-shot files the configured `evaluate` reads, under `data_dir`,
    and the folders of `evaluate.zeroshot_include_path` (their task YAMLs and data change the scores)."""
    from pruneflow.config import BUILTIN_ZEROSHOT_TASKS
    from pruneflow.text_data import PPL_SOURCES
    from pruneflow.zeroshot_tasks import task_file

    files = {f"{data_dir}/{PPL_SOURCES[name][0]}" for name in params.evaluate.ppl_datasets}
    files |= {Path(task_file(task, data_dir)).as_posix() for task in params.evaluate.zeroshot_tasks
              if task in BUILTIN_ZEROSHOT_TASKS}
    files |= {project_path(folder, Path(root)) for folder in params.evaluate.zeroshot_include_path or ()}
    return sorted(files)


def _evaluation_data(params: Params, root: Path) -> list[str]:
    return evaluation_files(params, root=root)


MODEL_DIR = "data/models/dense"
EVALUATE_PARAMS = ("seed", "runtime", "scale", "evaluate", "laptop.evaluate")


def _evaluate(name: str, model: str, model_id: str, metrics: str, **grid) -> Stage:
    return Stage(
        name=name, module="evaluate", gpu=True, params=EVALUATE_PARAMS, data=_evaluation_data,
        inputs={"model": model},
        args=("--model", "{input.model}", "--model-id", model_id, "--data-dir", DATA_DIR,
              "--out", "{output.metrics}"),
        outputs={"metrics": Output(metrics, dvc="metrics", cache=False)},
        **grid,
    )


def _prune(name: str, criteria: Literal["criteria", "servable_criteria"], out: str, *flags: str) -> Stage:
    """A prune instance (per-layer widths, or `--servable`): the same inputs and params, its own folder.
    A GPU stage: its forward passes (re-fit inputs, Gram matrices the cache lacks, the layout search) run
    on the device, so it takes a GPU slot like any other job that does."""
    return Stage(
        name=name, module="prune", criteria=criteria, ratios=True, gpu=True,
        params=("prune", "runtime.device", "activations.batch_size"),
        inputs={"model": "prepare_model.model", "scores": "score.scores",
                "activations": "cache_activations.activations", "calibration": "calibrate.calibration"},
        args=("--model", "{input.model}", "--scores", "{input.scores}", "--activations", "{input.activations}",
              "--calibration", "{input.calibration}", "--criterion", "{criterion}", "--ratio", "{ratio}",
              *flags, "--out", "{output.model}"),
        outputs={"model": Output(out, kind="dir")},
    )


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage(
        name="prepare_model", module="prepare_model", params=("model",), data=_model_source,
        args=("--out", "{output.model}"),
        outputs={"model": Output(MODEL_DIR, kind="dir")},
    ),
    Stage(
        name="calibrate", module="calibrate", params=("seed", "calibration"), data=_calibration_source,
        inputs={"model": "prepare_model.model"},
        args=("--model", "{input.model}", "--out", "{output.calibration}"),
        outputs={"calibration": Output("data/calibration/calibration.safetensors")},
    ),
    Stage(
        name="cache_activations", module="cache_activations", gpu=True,
        params=("seed", "runtime", "activations"),
        inputs={"model": "prepare_model.model", "calibration": "calibrate.calibration"},
        args=("--model", "{input.model}", "--calibration", "{input.calibration}", "--out", "{output.activations}"),
        outputs={"activations": Output("data/activations/activations.safetensors")},
    ),
    Stage(
        name="score", module="score", gpu=True, criteria="criteria",
        params=("seed", "runtime", "score", "activations.batch_size"),
        inputs={"model": "prepare_model.model", "calibration": "calibrate.calibration",
                "activations": "cache_activations.activations"},
        args=("--model", "{input.model}", "--calibration", "{input.calibration}", "--activations",
              "{input.activations}", "--criterion", "{criterion}", "--out", "{output.scores}"),
        outputs={"scores": Output("data/scores/{criterion}.safetensors")},
    ),
    _prune("prune", "criteria", "data/pruned/{criterion}/{ratio}"),
    # every layer the same widths (FFN a multiple of prune.servable_multiple): a vanilla config
    _prune("prune_servable", "servable_criteria", "data/servable/{criterion}/{ratio}", "--servable"),
    Stage(
        name="recover", module="recover", gpu=True, criteria="recovered_criteria", ratios=True,
        params=("seed", "runtime", "scale", "recover", "laptop.recover"), data=_recovery_data,
        inputs={"model": "prune.model", "teacher": "prepare_model.model"},
        args=("--model", "{input.model}", "--teacher", "{input.teacher}", "--out", "{output.model}"),
        outputs={"model": Output("data/recovered/{criterion}/{ratio}", kind="dir")},
    ),
    Stage(  # llama.cpp's format, for the checkpoints its llama / qwen2 graphs take (one width everywhere)
        name="export_gguf", module="export_gguf", criteria="servable_criteria", ratios=True,
        params=("export", "model.source"), inputs={"model": "prune_servable.model"},
        args=("--model", "{input.model}", "--out", "{output.gguf}"),
        outputs={"gguf": Output("data/gguf/servable/{criterion}/{ratio}.gguf")},
    ),
    _evaluate("evaluate_dense", "prepare_model.model", "dense", "reports/metrics/dense.json"),
    _evaluate("evaluate_pruned", "prune.model", "pruned/{criterion}/{ratio}",
              "reports/metrics/pruned/{criterion}/{ratio}.json", criteria="criteria", ratios=True),
    _evaluate("evaluate_recovered", "recover.model", "recovered/{criterion}/{ratio}",
              "reports/metrics/recovered/{criterion}/{ratio}.json", criteria="recovered_criteria", ratios=True),
    _evaluate("evaluate_servable", "prune_servable.model", "servable/{criterion}/{ratio}",
              "reports/metrics/servable/{criterion}/{ratio}.json", criteria="servable_criteria", ratios=True),
    Stage(
        name="report", module="report", params=("grid",), record_output="plots",
        inputs={"dense": "evaluate_dense.metrics", "pruned": "evaluate_pruned.metrics",
                "recovered": "evaluate_recovered.metrics", "servable": "evaluate_servable.metrics"},
        dvc_inputs={"dense": "reports/metrics", "pruned": "reports/metrics", "recovered": "reports/metrics",
                    "servable": "reports/metrics"},
        args=("--metrics-dir", "reports/metrics", "--out", "{output.markdown}", "--csv", "{output.csv}",
              "--plots-dir", "{output.plots}"),
        outputs={
            "markdown": Output("reports/results.md", cache=False),
            "csv": Output("reports/results.csv", dvc="plots", cache=False, plot={"x": "ratio", "y": "ppl_wikitext2"}),
            "plots": Output("reports/plots", kind="dir", cache=False),
        },
    ),
)}


# ------------------------------------------------------------------------------------------ the graph

# stages whose outputs no other stage reads: what a whole run asks for
LEAF_STAGES = tuple(name for name in STAGES
                    if not any(ref.split(".")[0] == name for other in STAGES.values() for ref in other.inputs.values()))


def upstream_output(reference: str) -> tuple[Stage, Output]:
    stage_name, role = reference.split(".")
    stage = STAGES[stage_name]
    return stage, stage.outputs[role]


def is_expansion(stage: Stage, reference: str) -> bool:
    """True when the input is every instance of an upstream output (placeholders this stage lacks)."""
    upstream, _ = upstream_output(reference)
    return not set(upstream.placeholders) <= set(stage.placeholders)


def grid_values(params: Params, stage: Stage) -> list[dict[str, str]]:
    """The placeholder values of every instance of a stage ([{}] for a stage without a grid)."""
    if stage.name == "export_gguf" and not gguf_export_applies(params.model.source, revision=params.model.revision):
        return []  # a family llama.cpp's graphs in our exporter do not cover: no GGUF files
    criteria = list(getattr(params.grid, stage.criteria)) if stage.criteria else [None]
    ratios = [format_ratio(r) for r in params.grid.ratios] if stage.ratios else [None]
    return [{k: v for k, v in (("criterion", c), ("ratio", r)) if v is not None} for c in criteria for r in ratios]


def fill(template: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def instance_id(stage: Stage, values: Mapping[str, str]) -> str:
    """`prune/taylor_element1/0.2`: a stage instance's name in records and stamps."""
    return "/".join([stage.name, *(values[key] for key in stage.placeholders if key in values)])


def instances(params: Params) -> Iterator[tuple[Stage, dict[str, str]]]:
    for stage in STAGES.values():
        for values in grid_values(params, stage):
            yield stage, values


def outputs_of(stage: Stage, values: Mapping[str, str]) -> dict[str, str]:
    return {role: fill(out.path, values) for role, out in stage.outputs.items()}


def all_outputs(params: Params) -> list[str]:
    """Every output the grid builds, in pipeline order (both engines build all of them)."""
    return [path for stage, values in instances(params) for path in outputs_of(stage, values).values()]


def upstream_instances(params: Params, stage: Stage, values: Mapping[str, str]) -> dict[str, list[tuple[Stage, dict]]]:
    """role -> the upstream (stage, values) instances whose output that input reads."""
    found: dict[str, list[tuple[Stage, dict]]] = {}
    for role, reference in stage.inputs.items():
        upstream, _ = upstream_output(reference)
        if is_expansion(stage, reference):
            found[role] = [(upstream, v) for v in grid_values(params, upstream)]
        else:
            found[role] = [(upstream, {k: values[k] for k in upstream.placeholders})]
    return found


def input_paths(params: Params, stage: Stage, values: Mapping[str, str]) -> dict[str, list[str]]:
    """role -> the upstream output paths of one instance."""
    return {role: [fill(upstream_output(stage.inputs[role])[1].path, v) for _, v in upstreams]
            for role, upstreams in upstream_instances(params, stage, values).items()}


def command(stage: Stage, inputs: Mapping[str, str], outputs: Mapping[str, str], values: Mapping[str, str],
            params_file: str = PARAMS_FILE) -> str:
    """The stage's command line with its paths and grid values filled in."""
    words = [f"python -m pruneflow.stages.{stage.module} --params {params_file}"]
    for arg in stage.args:
        for role, path in inputs.items():
            arg = arg.replace("{input." + role + "}", path)
        for role, path in outputs.items():
            arg = arg.replace("{output." + role + "}", path)
        words.append(fill(arg, values))
    return " ".join(words)


def stage_code(root: str | Path, stage: Stage) -> list[str]:
    """The project source files a stage runs (its import closure), relative to the project."""
    from pruneflow.pipeline.code_deps import stage_code as closure

    return closure(root, f"pruneflow.stages.{stage.module}")


def stage_data(params: Params, stage: Stage, root: str | Path) -> list[str]:
    return stage.data(params, Path(root))


def stage_for_model_id(model_id: str) -> tuple[Stage, dict[str, str]] | None:
    """The evaluate instance of a `--model-id` (dense, {pruned,recovered,servable}/<c>/<r>), if it is one."""
    if model_id == "dense":
        return STAGES["evaluate_dense"], {}
    parts = model_id.split("/")
    if len(parts) == 3 and parts[0] in ("pruned", "recovered", "servable"):
        return STAGES[f"evaluate_{parts[0]}"], {"criterion": parts[1], "ratio": parts[2]}
    return None


# -------------------------------------------------------------------------------------------- dvc.yaml

DVC_HEADER = """\
# GENERATED from src/pruneflow/pipeline/graph.py and params.yaml by
#   python -m pruneflow.pipeline.plan --write-dvc-yaml
# (`snakemake` and every stage refresh it when params.yaml names other data files or a stage's imports
# change). The same stages as the Snakefile: same commands, data files, source files and params.
# The grid comes from params.yaml through foreach/matrix, so `dvc exp run -S grid.ratios=[...]` works.
"""


def _dvc_item(stage: Stage) -> dict[str, str]:
    """How a placeholder is written inside the stage's DVC definition."""
    if stage.criteria and stage.ratios:
        return {"criterion": "${item.criterion}", "ratio": "${item.ratio}"}
    if stage.criteria:
        return {"criterion": "${item}"}
    return {}


def dvc_stage(stage: Stage, params: Params, root: str | Path) -> dict:
    """One stage of dvc.yaml (with foreach / matrix for the grid)."""
    item = _dvc_item(stage)
    inputs, deps = {}, []
    for role, reference in stage.inputs.items():
        if is_expansion(stage, reference):
            inputs[role] = stage.dvc_inputs[role]
        else:
            inputs[role] = fill(upstream_output(reference)[1].path, item)
        if inputs[role] not in deps:
            deps.append(inputs[role])
    deps += [path for path in stage_data(params, stage, root) if path not in deps]
    deps += stage_code(root, stage)
    outputs = {role: fill(out.path, item) for role, out in stage.outputs.items()}
    body: dict = {"cmd": command(stage, inputs, outputs, item), "deps": deps, "params": list(stage.params)}
    for role, out in stage.outputs.items():
        entry: dict = {"persist": True}
        if not out.cache:
            entry["cache"] = False
        if out.plot:
            entry.update(out.plot)
        body.setdefault(out.dvc, []).append({outputs[role]: entry})
    if stage.criteria and stage.ratios:
        return {"matrix": {"criterion": f"${{grid.{stage.criteria}}}", "ratio": "${grid.ratios}"}, **body}
    if stage.criteria:
        return {"foreach": f"${{grid.{stage.criteria}}}", "do": body}
    return body


def render_dvc_yaml(params: Params, root: str | Path) -> str:
    """dvc.yaml for these params (data and source lists resolved; the grid left to DVC's templating)."""
    import yaml

    # export_gguf only for a family the exporter covers (grid_values' rule, the source read relative to root)
    stages = {stage.name: dvc_stage(stage, params, root) for stage in STAGES.values()
              if stage.name != "export_gguf" or gguf_export_applies(params.model.source, root, params.model.revision)}
    text = yaml.safe_dump({"stages": stages}, sort_keys=False, width=1000, default_flow_style=False)
    return DVC_HEADER + text
