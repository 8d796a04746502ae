"""Mistral: Llama's block layout (GQA, SwiGLU), optional sliding-window attention, no biases."""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="mistral",
    model_type="mistral",
    architecture="MistralForCausalLM",
    config_class="MistralConfig",
    decoder_layer="MistralDecoderLayer",
    structures="GQA, SwiGLU, sliding-window attention carried over",
    # Mistral-7B: hidden 4096, 32 query / 8 KV heads, FFN 14336
    gguf_export=True,
    tiny_configs={"mistral": {}},
)
