"""Gemma 2: GQA, GeGLU, RMSNorm before and after each sublayer, logit soft-capping, alternating
sliding-window layers, head_dim independent of hidden size, tied embeddings scaled by sqrt(hidden).

None of these sits between a removed unit and what the criteria measure: the post-attention and
post-feed-forward norms act on the hidden-size outputs of o_proj and down_proj, soft-capping on
attention logits (per head) and final logits, the embedding scale on the residual stream.
"""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="gemma2",
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    config_class="Gemma2Config",
    decoder_layer="Gemma2DecoderLayer",
    structures="GQA, pre- and post-sublayer norms, attention and final logit soft-capping, sliding-window "
               "layers, head_dim independent of hidden, tied embeddings scaled by sqrt(hidden)",
    other_modules=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm"),
    tiny_configs={
        # Gemma-2-2B: hidden 2304, 8 query / 4 KV heads of 256, FFN 9216, query_pre_attn_scalar 256,
        # soft-capping 50 (attention) / 30 (final), sliding window 4096 on every other layer, tied
        "gemma2": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 32, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "sliding_window": 8, "tie_word_embeddings": True,
                   "hidden_activation": "gelu_pytorch_tanh"},
    },
)
