"""Qwen2 / Qwen2.5: Llama's block layout with q/k/v biases, which follow their rows when heads go."""

from pruneflow.families.spec import Family

FAMILY = Family(
    name="qwen2",
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    config_class="Qwen2Config",
    decoder_layer="Qwen2DecoderLayer",
    structures="GQA with q/k/v biases (sliced with their heads), tied embeddings",
    # Qwen2.5-0.5B: hidden 896, 14 query / 2 KV heads, FFN 4864, q/k/v biases, tied embeddings
    gguf_export=True,
    tiny_configs={"qwen2": {}},
)
