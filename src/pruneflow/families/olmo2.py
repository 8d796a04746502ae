"""OLMo 2: RMSNorm after attention and after the MLP (not before), and query/key RMSNorm over the
whole q_proj / k_proj output (all heads together, before the split into heads).

q_norm / k_norm therefore hold one weight per query / key row: they lose the rows of removed heads.
Because their statistic is taken over all heads, removing a head also changes how the kept heads are
normalised (the mean square runs over fewer rows); pruning equals zeroing the head's output with the
norms taken over the kept rows, which is what the family's unit test checks. No biases.
"""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="olmo2",
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    config_class="Olmo2Config",
    decoder_layer="Olmo2DecoderLayer",
    structures="post-sublayer norms, query/key RMSNorm over the whole projection (sliced with the kept heads), MHA",
    sliced_norms={"self_attn.q_norm": "q", "self_attn.k_norm": "kv"},
    other_modules=("post_attention_layernorm", "post_feedforward_layernorm"),
    tiny_configs={
        # OLMo-2-0425-1B: hidden 2048, 16 query / 16 KV heads (MHA), FFN 8192, untied, rms_norm_eps 1e-6
        "olmo2": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "head_dim": 16, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    },
)
