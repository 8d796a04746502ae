"""The README.md model card every model folder carries (Hugging Face's format, via huggingface_hub).

What a person finding the folder on disk or on the Hub needs: the model it was made from and its
license (carried over from that model's own card or GGUF header), the method (criterion, layout,
re-fit, recovery), requested and measured ratio and parameter counts, how to load it, the commands
that made it (the provenance chain), and, when measured, the evaluation results as `model-index`
(the Hub renders and indexes them). Built with `huggingface_hub.ModelCard` / `ModelCardData` /
`EvalResult` so the metadata is exactly what the Hub parses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pruneflow.sources import HUB_ID, PRUNED_MODEL_TYPES, read_config_dict

CARD_FILE = "README.md"
# evaluation names in metrics JSON -> (dataset type, dataset name, split) for model-index
_PPL_DATASETS = {"wikitext2": ("wikitext", "WikiText-2 (raw)", "test"), "ptb": ("ptb_text_only", "PTB", "validation")}


def read_card_data(folder: str | Path) -> dict[str, Any]:
    """The metadata (YAML header) of a folder's model card; {} when it has none."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a hand-written README without a valid header carries no metadata
        return {}


def eval_results(metrics: Mapping[str, Any]) -> list[EvalResult]:
    """model-index entries from an evaluate-stage metrics file: perplexity and zero-shot accuracy."""
    results = []
    for name, entry in (metrics.get("perplexity") or {}).items():
        dataset_type, dataset_name, split = _PPL_DATASETS.get(name, (name, name, None))
        results.append(EvalResult(
            task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
            metric_type="perplexity", metric_value=round(float(entry["ppl"]), 4),
            metric_name=f"perplexity@{entry.get('seq_len')} ({entry.get('windows')} windows)"))
    for task, entry in (metrics.get("zeroshot") or {}).items():
        metric = entry.get("headline_metric", "acc")
        if entry.get(metric) is None:
            continue
        results.append(EvalResult(
            task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
            metric_value=round(float(entry[metric]), 4),
            metric_name=f"{metric} (zero-shot, {entry.get('n')} documents)"))
    return results


def _loading_snippet(per_layer: bool) -> str:
    remote = ", trust_remote_code=True" if per_layer else ""
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("PATH"{remote})',
             'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```"]
    if per_layer:
        lines.append("\nThe layers have different widths: `configuration_pruneflow.py` and `modeling_pruneflow.py` "
                     "in this folder build them (torch and transformers only). lm-eval: `lm_eval --model hf "
                     "--model_args pretrained=PATH,trust_remote_code=True ...`.")
    else:
        lines.append("\nEvery layer has the same widths: the config is the family's own, so vLLM, lm-eval and "
                     "llama.cpp's converter load it as they load the original.")
    return "\n".join(lines)


def build_model_card(folder: str | Path, *, title: str, chain: Sequence[Mapping[str, Any]],
                     summary: Mapping[str, Any] | None = None, recovery: Mapping[str, Any] | None = None,
                     base_model: str | None = None, license: str | None = None,
                     metrics: Mapping[str, Any] | None = None) -> ModelCard:
    """The card of the model saved in `folder` (its config.json must be written already)."""
    config = read_config_dict(folder)
    per_layer = config.get("model_type") in PRUNED_MODEL_TYPES
    results = eval_results(metrics) if metrics else []
    data = ModelCardData(
        base_model=base_model if base_model and HUB_ID.match(base_model) else None,
        license=license, library_name="transformers", pipeline_tag="text-generation",
        tags=["pruneflow", "structured-pruning", *(["pruned"] if summary else []), *(["custom_code"] if per_layer else [])],
        model_name=title if results else None, eval_results=results or None)
    lines = [f"# {title}", ""]
    source = base_model or (chain[0].get("source_location") if chain else None) or "(unknown)"
    if summary:
        lines += [f"Structurally pruned from `{source}` with pruneflow.", "",
                  "| | |", "|---|---|",
                  f"| criterion | {summary.get('criterion')} |",
                  f"| layout | {_unit_text(summary.get('attention_unit'))}, {summary.get('allocation')} "
                  f"allocation, layers {_layer_span(summary.get('pruned_layers'))} pruned |",
                  f"| re-fit after removal | {summary.get('reconstruction')} |",
                  f"| requested ratio | {summary.get('requested_ratio')} |",
                  f"| measured ratio | {summary.get('achieved_ratio', 0.0):.4f} |",
                  f"| parameters | {summary.get('params_before', 0):,} -> {summary.get('params_after', 0):,} |"]
        if summary.get("width_multiple"):
            lines.append(f"| widths | the same in every layer, FFN a multiple of {summary['width_multiple']} |")
        if recovery:
            lines.append(f"| recovery | {recovery.get('objective')} ({recovery.get('method')}), "
                         f"{recovery.get('optimizer_steps')} optimizer steps |")
        lines.append(f"| weights | {config.get('dtype', 'float32')}, safetensors |")
    else:
        lines.append(f"The dense model `{source}` ({config.get('dtype', 'float32')} safetensors), as pruneflow's "
                     "pipeline starts from it.")
    lines += ["", "## Loading", "", _loading_snippet(per_layer), ""]
    if results:
        lines += ["## Evaluation", "", "| dataset | metric | value |", "|---|---|---|"]
        lines += [f"| {r.dataset_name} | {r.metric_name or r.metric_type} | {r.metric_value} |" for r in results]
        lines.append("")
    lines += ["## How it was made", "", "Each step's command (params in `provenance.json`):", ""]
    lines += [f"1. {entry.get('stage')}: `{entry.get('command', '')}`" for entry in chain]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n")


def _unit_text(unit: str | None) -> str:
    """What lost width: attention units of a kind, or (no unit: the FFN-only layout) FFN channels only."""
    return f"{unit} attention units" if unit else "FFN channels only"


def _layer_span(layers: Sequence[int] | None) -> str:
    if not layers:
        return "none"
    return f"{min(layers)}..{max(layers)}" if list(layers) == list(range(min(layers), max(layers) + 1)) else \
        ", ".join(map(str, layers))


def write_model_card(folder: str | Path, *, parent: str | Path | None = None, title: str | None = None,
                     metrics_file: str | Path | None = None, **source: Any) -> Path:
    """Write `folder`/README.md from the files the folder holds (summaries, provenance) and its parent's
    card (base model and license carry over); `source` gives base_model / license for a first card."""
    from pruneflow.provenance import read_chain

    folder = Path(folder)
    inherited = read_card_data(parent) if parent is not None else {}

    def summary(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    metrics = json.loads(Path(metrics_file).read_text()) if metrics_file else None
    card = build_model_card(
        folder, title=title or folder.name, chain=read_chain(folder), summary=summary("pruning_summary.json"),
        recovery=summary("recovery_summary.json"),
        base_model=source.get("base_model") or inherited.get("base_model"),
        license=source.get("license") or inherited.get("license"), metrics=metrics)
    path = folder / CARD_FILE
    card.save(path)
    return path


def source_card_facts(source) -> dict[str, str | None]:
    """Base model and license of a model source (`sources.ModelSource`): the embedded GGUF's header,
    a local folder's card, or a hub model's cached card."""
    from pruneflow.sources import EMBEDDED_HUB_ID

    if source.kind == "embedded":
        from gguf import GGUFReader

        field = GGUFReader(str(Path(source.location) / source.gguf_file)).fields.get("general.license")
        license = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None and field.data else None
        return {"base_model": EMBEDDED_HUB_ID, "license": license}
    if source.kind == "local":
        return {"base_model": None, "license": read_card_data(source.location).get("license")}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.location, CARD_FILE)
    license = read_card_data(Path(cached).parent).get("license") if isinstance(cached, str) else None
    return {"base_model": source.location, "license": license}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pruneflow.model_card FOLDER --metrics METRICS.json [--out DIR]`: the card with the
    evaluation results (model-index), in a copy of the folder ready to upload (weights hard-linked
    where the file system allows), or in place without --out."""
    import argparse
    import os
    import shutil

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0] if main.__doc__ else None)
    parser.add_argument("folder", type=Path, help="a pruneflow model folder")
    parser.add_argument("--metrics", type=Path, required=True, help="its evaluate-stage metrics JSON")
    parser.add_argument("--out", type=Path, default=None, help="write a copy here (default: the folder itself)")
    args = parser.parse_args(argv)
    from pruneflow.errors import DataError

    if not (args.folder / "config.json").is_file():
        raise SystemExit(f"error: {str(args.folder)!r} is not a model folder (no config.json)")
    try:
        metrics = json.loads(args.metrics.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --metrics {str(args.metrics)!r} is not a readable metrics JSON: {exc}") from None
    if not isinstance(metrics, dict) or not ({"perplexity", "zeroshot"} & set(metrics)):
        raise SystemExit(f"error: --metrics {str(args.metrics)!r} holds no 'perplexity' or 'zeroshot' results")
    target = args.folder
    if args.out is not None:
        if args.out.exists():
            raise SystemExit(f"error: --out {str(args.out)!r} exists; allowed: a new folder")
        shutil.copytree(args.folder, args.out, copy_function=_link_or_copy)
        target = args.out
        os.chmod(target, 0o755)
    card = read_card_data(args.folder)
    lines = ModelCard.load(args.folder / CARD_FILE).text.strip().splitlines() \
        if (args.folder / CARD_FILE).is_file() else []
    title = lines[0].lstrip("# ").strip() if lines else args.folder.name
    try:
        write_model_card(target, title=title or args.folder.name, metrics_file=args.metrics,
                         base_model=card.get("base_model"), license=card.get("license"))
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(target / CARD_FILE)


def _link_or_copy(src: str, dst: str) -> str:
    import os
    import shutil

    if Path(src).name == CARD_FILE:  # rewritten: never a link into the source folder
        return shutil.copy2(src, dst)
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


if __name__ == "__main__":
    main()
