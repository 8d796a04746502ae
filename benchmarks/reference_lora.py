"""Reference recovery: LLM-Pruner's `post_training.py` flow (peft LoRA + Hugging Face `Trainer`).

What a user runs after a stand-alone pruning script: load the pruned model, wrap it with LoRA on
every linear layer of the decoder, train with `transformers.Trainer` (gradient accumulation to the
recipe's batch, linear warmup, periodic evaluation on a held-out split, best checkpoint kept),
merge and save. The examples are exactly pruneflow's (same files, seeded mix, split, Alpaca
prompts or text blocks, cutoff; its objective is always the next-token loss), so only the training
engine and the scripts around it differ; the settings come
from the `recover:` section of a params file (its `laptop:` caps when scale is laptop).

    python benchmarks/reference_lora.py --params params.yaml --model PRUNED_DIR --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True, help="pruned model folder (pruneflow format)")
    parser.add_argument("--out", type=Path, required=True, help="merged model folder to write")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from pruneflow.checkpoint import load_pruned, save_pruned
    from pruneflow.config import load_params
    from pruneflow.modeling import load_tokenizer
    from pruneflow.recovery import check_lora_targets, load_training_data

    started = time.perf_counter()
    params = load_params(args.params)
    cfg = params.recover
    transformers.set_seed(params.seed)
    tokenizer = load_tokenizer(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, val = load_training_data(cfg.data, tokenizer, cutoff_len=cfg.cutoff_len,
                                    train_on_inputs=cfg.train_on_inputs, val_size=cfg.val_size, seed=params.seed,
                                    max_train_samples=cfg.max_train_samples)

    cuda = torch.cuda.is_available()
    model = load_pruned(args.model, dtype=torch.bfloat16 if cuda else torch.float32,
                        device="cuda" if cuda else "cpu")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=check_lora_targets(model, cfg), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    scratch = args.out.with_name(args.out.name + ".trainer")
    training = transformers.TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=max(1, cfg.batch_size // cfg.micro_batch_size),
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.learning_rate,
        bf16=cuda,
        logging_steps=10,
        optim="adamw_torch",
        eval_strategy="steps" if len(val) else "no",
        save_strategy="steps",
        eval_steps=cfg.eval_every_steps,
        save_steps=cfg.eval_every_steps,
        save_total_limit=2,
        load_best_model_at_end=bool(len(val)),
        report_to=[],
        seed=params.seed,
        dataloader_num_workers=0,
    )
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                                   padding=True)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=train,
                                   eval_dataset=val if len(val) else None, data_collator=collator)
    model.config.use_cache = False
    result = trainer.train()
    merged = model.merge_and_unload().float().cpu()
    if args.out.exists():
        shutil.rmtree(args.out)
    save_pruned(merged, args.out, tokenizer=tokenizer)
    shutil.rmtree(scratch, ignore_errors=True)
    summary = {"seconds": time.perf_counter() - started, "train_seconds": result.metrics.get("train_runtime"),
               "optimizer_steps": result.global_step, "train_loss": result.training_loss,
               "train_examples": len(train), "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    (args.out / "reference_lora_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
