"""Stage 5: recovery of a pruned model (next-token loss or distillation from the dense model; LoRA
merged afterwards, or every parameter) on instructions and/or plain text, saved as a plain model.

Runs as one process or under `torchrun` / `accelerate launch` (one process per GPU); only the main
process writes the output folder, the summary, the model card and the MLflow run. Checkpoints go to
`.<name>.state/`, a hidden folder next to the output (a failed job's outputs are deleted by Snakemake,
this folder is not): rerunning the same command resumes from the last one, and the folder is removed
once the output is written. On SIGTERM the stage saves a checkpoint at the end of the current step and exits with
status 143 without writing the output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import load_params, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "recover"
SUMMARY_FILE = "recovery_summary.json"
PREEMPTED_STATUS = 143  # 128 + SIGTERM: what a shell reports for a job the signal ended


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="pruned model folder")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="dense model folder (the teacher; read only with recover.objective: distill)")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the recovered model")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params.recover

    from pruneflow.modeling import load_tokenizer, offline_by_default
    from pruneflow.runtime import resolve_device, resolve_dtype, seed_everything

    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    require_file(args.model, "model folder")
    offline_by_default()

    from pruneflow.checkpoint import model_skeleton
    from pruneflow.errors import ConfigError
    from pruneflow.recovery import (
        TrainingPreempted,
        check_lora_targets,
        is_main_process,
        is_sharded_run,
        load_training_data,
        process_device,
        recover,
    )

    # settings that do not fit this model fail on its shapes alone, before data or weights are read
    skeleton = model_skeleton(args.model)
    if cfg.method == "lora":
        check_lora_targets(skeleton, cfg)
    positions = getattr(skeleton.config, "max_position_embeddings", None)
    if positions and cfg.cutoff_len > positions:
        raise ConfigError(f"recover.cutoff_len={cfg.cutoff_len} is not allowed for this model; allowed: "
                          f"an integer <= max_position_embeddings={positions} of {args.model}/config.json")
    distill = cfg.objective == "distill"
    if distill:
        if args.teacher is None:
            raise ConfigError("recover.objective='distill' needs the dense teacher: pass --teacher MODEL_DIR")
        require_file(args.teacher, "teacher model folder")
        teacher_vocab = model_skeleton(args.teacher).config.vocab_size
        if teacher_vocab != skeleton.config.vocab_size:
            raise ConfigError(f"--teacher {args.teacher} has a vocabulary of {teacher_vocab} tokens, the pruned "
                              f"model {skeleton.config.vocab_size}; allowed: the dense model it was pruned from")

    import torch

    from pruneflow.architectures import count_parameters
    from pruneflow.checkpoint import checkpoint_dtype, load_pruned, placeholder_model, save_pruned
    from pruneflow.model_card import write_model_card
    from pruneflow.pipeline.atomic import atomic_dir
    from pruneflow.pipeline.records import read_record, recorder, write_record_file
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.provenance import read_chain, step, write_chain

    tokenizer = load_tokenizer(args.model)
    # data problems fail here, before the model is loaded
    train_tokens, val_tokens = load_training_data(
        cfg.data, tokenizer, cutoff_len=cfg.cutoff_len, train_on_inputs=cfg.train_on_inputs, val_size=cfg.val_size,
        seed=params.seed, max_train_samples=cfg.max_train_samples)
    seed_everything(params.seed)
    device = process_device(device)  # cuda:LOCAL_RANK under a launcher
    main_process = is_main_process()
    tracked = {**stage_params(params, "seed", "runtime", "scale", "recover"), "model": str(args.model)}
    state_dir = state_folder(args.out)
    inputs = {"model": args.model, **({"teacher": args.teacher} if distill else {}),
              **{f"data{i}": Path(p) for i, p in enumerate(cfg.data)}}
    # the other processes train their share and write nothing: no MLflow run, no output folder
    mlflow = params.mlflow if main_process else dataclasses.replace(params.mlflow, enabled=False)
    try:
        with stage_run(STAGE, settings=mlflow, params=tracked, run_name=f"recover {args.model}",
                       inputs=inputs) as run:
            # base weights in the runtime dtype (bf16 on GPU); LoRA adapters train in fp32 under autocast.
            # Sharded (FSDP), only the main process reads the weights, into host memory; the others hold
            # placeholders and receive their shards from it (full training: the student already in fp32).
            sharded = is_sharded_run(cfg)

            def load(path: Path, trained: bool):
                if not sharded:
                    return load_pruned(path, dtype=dtype, device=device)
                if main_process:
                    return load_pruned(path, dtype=dtype, device="cpu")
                return placeholder_model(path, dtype=torch.float32 if trained and cfg.method == "full" else dtype)

            model = load(args.model, True)
            teacher = load(args.teacher, False) if distill else None
            teacher_mib = (sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
                           if teacher is not None else None)

            def log_entry(entry: dict) -> None:
                run.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=entry.get("step"))

            def train(adapter_dir: Path | None):
                return recover(model, tokenizer, train_tokens, val_tokens, cfg, seed=params.seed, device=device,
                               dtype=dtype, teacher=teacher, on_log=log_entry, adapter_dir=adapter_dir,
                               state_dir=state_dir, inputs={**tracked, **input_identities(inputs)},
                               progress=main_process)

            if not main_process:
                train(None)
                return
            with atomic_dir(args.out) as tmp:  # a failed or killed run leaves the previous output in place
                result = train(tmp / "adapter" if cfg.method == "lora" else None)
                merged = result.model.to("cpu")
                summary = {
                    "initial_val_loss": result.initial_val_loss,
                    "best_val_loss": result.best_val_loss,
                    "best_step": result.best_step,
                    "optimizer_steps": result.optimizer_steps,
                    "train_examples": result.train_examples,
                    "val_examples": len(val_tokens),
                    "objective": cfg.objective,
                    "method": cfg.method,
                    "processes": result.processes,
                    "sharding": "fsdp" if result.sharded else "none",
                    "resumed_from_step": result.resumed_from_step,
                    "seconds": result.seconds,
                    "teacher_seconds": result.teacher_seconds,
                    "teacher_weights_mib": teacher_mib,
                    "params": count_parameters(merged),
                    "device": str(device),
                    "peak_gpu_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                            if device.type == "cuda" else None),
                    "dtype": str(dtype).removeprefix("torch."),
                    "command": command_line(),
                    "history": result.history,
                }
                save_pruned(merged, tmp, tokenizer=tokenizer, dtype=checkpoint_dtype(args.model))
                (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
                if (args.model / "pruning_summary.json").is_file():
                    (tmp / "pruning_summary.json").write_text((args.model / "pruning_summary.json").read_text())
                chain = read_chain(args.model)
                chain.append(step(STAGE, command_line(), tracked, optimizer_steps=result.optimizer_steps,
                                  best_val_loss=result.best_val_loss))
                write_chain(tmp, chain)
                instance = recovered_instance(read_record(args.model))
                write_model_card(tmp, parent=args.model, title=" ".join(["recovered", *instance.values()]))
                write_record_file(tmp, recorder(STAGE, recovered_instance(read_record(args.model)),
                                                inputs={"model": args.model}).record(params))
            shutil.rmtree(state_dir, ignore_errors=True)  # the output is whole: nothing left to resume
            run.log_metrics({k: v for k, v in summary.items()
                             if k in ("initial_val_loss", "best_val_loss", "optimizer_steps", "seconds",
                                      "teacher_seconds", "peak_gpu_memory_mib")})
            run.log_artifact(args.out / SUMMARY_FILE)
    except TrainingPreempted as exc:
        print(f"pruneflow {STAGE}: {exc}", file=sys.stderr)
        raise SystemExit(PREEMPTED_STATUS) from None


def state_folder(out: Path) -> Path:
    """Where training checkpoints go: next to the output, so a failed job's deleted output keeps them, and
    hidden (`.<name>.state`), like the atomic writes' temporaries, from what Snakemake, DVC and users list."""
    return out.parent / f".{out.name}.state"


def input_identities(paths: dict[str, Path]) -> dict[str, list]:
    """Each input as (file, size, modification time) rows, cheap enough for model folders of many GB:
    a rebuilt input is another input, and a state folder of the old one is not resumed."""
    identities: dict[str, list] = {}
    for role, path in paths.items():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        identities[role] = [[str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size,
                             f.stat().st_mtime_ns] for f in files]
    return identities


def recovered_instance(model_record: dict | None) -> dict[str, str]:
    """A recovered model is the grid instance of the pruned model it starts from (criterion, ratio)."""
    instance = str((model_record or {}).get("instance", ""))
    parts = instance.split("/")
    if len(parts) == 3 and parts[0] == "prune":
        return {"criterion": parts[1], "ratio": parts[2]}
    return {}


if __name__ == "__main__":
    run_cli(STAGE, main)
