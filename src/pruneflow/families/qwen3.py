"""Qwen3 (dense): GQA with RMSNorm on each query and key head, and head_dim independent of hidden size.

q_norm / k_norm have one weight of head_dim entries shared by all heads of the layer, applied per head
after q_proj / k_proj: a removed head takes nothing with it and the kept heads are normalised exactly as
before, so nothing is sliced. No biases.
"""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="qwen3",
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    config_class="Qwen3Config",
    decoder_layer="Qwen3DecoderLayer",
    structures="GQA, per-head query/key RMSNorm (shared over heads, unchanged), head_dim independent of hidden",
    other_modules=("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"),
    tiny_configs={
        # Qwen3-0.6B: hidden 1024, 16 query / 8 KV heads of 128 (heads x head_dim = 2 x hidden), FFN 3072, tied
        "qwen3": {"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 32, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    },
)
