"""Phi-3 and Phi-4-mini (`Phi3ForCausalLM`): q, k and v in one fused `qkv_proj` (query rows, then key
rows, then value rows) and gate and up in one `gate_up_proj` (gate rows, then up rows).

While pruneflow works, each fused Linear is replaced by its parts (one Linear per logical projection,
outputs concatenated in the stored order), so every criterion and the surgery slice q, k, v, gate and
up consistently; the checkpoint is written fused again. Phi-4-mini adds partial rotary embeddings and
tied embeddings (config facts, carried over). The attention reads the query width from the config, so
a layer whose width differs from the config gets a view of the config with its own widths.
"""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="phi3",
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    config_class="Phi3Config",
    decoder_layer="Phi3DecoderLayer",
    structures="fused qkv_proj and gate_up_proj (sliced consistently), MHA (Phi-3) or GQA with partial rotary "
               "embeddings and tied embeddings (Phi-4-mini)",
    projections={"q_proj": "self_attn.qkv_proj.q_proj", "k_proj": "self_attn.qkv_proj.k_proj",
                 "v_proj": "self_attn.qkv_proj.v_proj", "o_proj": "self_attn.o_proj",
                 "gate_proj": "mlp.gate_up_proj.gate_proj", "up_proj": "mlp.gate_up_proj.up_proj",
                 "down_proj": "mlp.down_proj"},
    fused={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")},
    tiny_configs={
        # Phi-3-mini-4k: hidden 3072, 32 query / 32 KV heads (MHA), FFN 8192, untied
        "phi3": {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "head_dim": 16, "tie_word_embeddings": False},
        # Phi-4-mini: hidden 3072, 24 query / 8 KV heads of 128, FFN 8192, partial_rotary_factor 0.75, tied,
        # longrope scaling (48 short and long factors: rotary dim 96 / 2) beyond its original 4096 positions
        "phi4_mini": {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 6,
                      "num_key_value_heads": 2, "head_dim": 16, "partial_rotary_factor": 0.75,
                      "tie_word_embeddings": True, "original_max_position_embeddings": 64,
                      "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0],
                                       "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                                       "original_max_position_embeddings": 64}},
    },
)
