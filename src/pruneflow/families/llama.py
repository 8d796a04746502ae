"""Llama (SmolLM2, Llama 2, Llama 3.x): grouped-query attention, SwiGLU, RMSNorm before each sublayer.

Llama's config can switch on biases for attention (`attention_bias`) and the MLP (`mlp_bias`), so it
is the family bias compensation writes. Llama 3.x adds tied embeddings (3.2 1B/3B) and `llama3` rope
scaling: both are config facts a pruned checkpoint carries over unchanged.
"""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="llama",
    model_type="llama",
    architecture="LlamaForCausalLM",
    config_class="LlamaConfig",
    decoder_layer="LlamaDecoderLayer",
    structures="GQA or MHA; optional attention/MLP biases (bias compensation); tied embeddings and llama3 rope "
               "scaling (Llama 3.x) carried over",
    output_bias_flags=("attention_bias", "mlp_bias"),
    gguf_export=True,
    tiny_configs={
        # SmolLM2-135M: hidden 576, 9 query / 3 KV heads, FFN 1536, tied embeddings
        "llama": {},
        # Llama-3.2-1B: hidden 2048, 32 query / 8 KV heads of 64, FFN 8192, tied, rope_theta 500000,
        # rope_scaling llama3 (factor 32, low/high frequency factors 1/4, original context 8192)
        "llama3": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
                   "head_dim": 8, "tie_word_embeddings": True, "rope_theta": 500000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    },
)
