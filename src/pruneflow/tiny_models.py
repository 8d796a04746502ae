"""Tiny random decoder models and a tiny offline tokenizer, for tests and smoke runs.

Every supported family, a few layers and small widths: a whole pipeline run on one takes seconds per
stage on a CPU. `TINY_FAMILIES` (Llama, Mistral, Qwen2: GQA, 4 layers, hidden 64) share one shape;
`TINY_CONFIGS` adds one config per published model shape of the other families (each family module in
`pruneflow.families` names the published config it scales down). `python -m pruneflow.tiny_models
OUT_DIR --family NAME` writes one as a Hugging Face folder (config, safetensors, tokenizer).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from pruneflow.families import TINY_CONFIGS as _TINY

TINY_FAMILIES = ("llama", "mistral", "qwen2")
TINY_CONFIGS = tuple(_TINY)  # every tiny config: the three above and llama3, qwen3, gemma2, gemma3, phi3, ...

_DEFAULT_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes attention heads and channels. "
    "Question: What is the capital of France?\nAnswer: Paris. Below is an instruction that describes "
    "a task. Write a response that appropriately completes the request. 0 1 2 3 4 5 6 7 8 9 = @-@ , . "
)


def tiny_config(family: str = "llama", vocab_size: int = 384, **overrides):
    """A tiny config of `family` (a name of `TINY_CONFIGS`): 4 layers; Llama, Mistral and Qwen2 have hidden
    64 and 4 query heads sharing 2 KV heads of 16, FFN 96; the others their family module's shape."""
    if family not in _TINY:
        raise ValueError(f"family={family!r} is not allowed; allowed: {', '.join(_TINY)}")
    spec, shape = _TINY[family]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    kwargs.update(shape)
    kwargs.update(overrides)
    return AutoConfig.for_model(spec.model_type, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM, in eval mode, float32, deterministic for `seed`."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # random biases so that attention-bias handling (Qwen2) is actually exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 384, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a few sentences (no hub access needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts or [_DEFAULT_TRAINING_TEXT] * 4), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def write_tiny_checkpoint(out_dir: str | Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny model and its tokenizer as a plain Hugging Face folder."""
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", default="llama", choices=TINY_CONFIGS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out_dir, family=args.family, seed=args.seed))


if __name__ == "__main__":
    main()
