"""Gemma 3 (text models, `Gemma3ForCausalLM`: 270M, 1B): Gemma 2's block plus per-head query/key
RMSNorm, local (sliding) and global layers with their own rope, and multi-query attention in the
small sizes.

With one KV head per layer (MQA) a whole KV group cannot go: attention loses query heads
(`prune.attention_unit: query_head`, which `auto` picks by itself) or nothing. q_norm / k_norm span
head_dim and are shared by the heads: nothing to slice. The multimodal Gemma 3 sizes
(`Gemma3ForConditionalGeneration`) are not accepted.
"""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="gemma3",
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    config_class="Gemma3TextConfig",
    decoder_layer="Gemma3DecoderLayer",
    structures="MQA (query heads only) or GQA, per-head query/key RMSNorm, pre- and post-sublayer norms, "
               "local/global layers, head_dim independent of hidden, tied embeddings scaled by sqrt(hidden)",
    other_modules=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"),
    tiny_configs={
        # Gemma-3-1B: hidden 1152, 4 query heads sharing 1 KV head of 256 (MQA), FFN 6912,
        # query_pre_attn_scalar 256, sliding window 512 on 5 of every 6 layers, tied
        "gemma3": {"hidden_size": 64, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 1,
                   "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "tie_word_embeddings": True,
                   "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]},
    },
)
