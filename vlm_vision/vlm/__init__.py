"""The vision-language model: encoder + adapter (`vlm_vision.adapters`) + any causal LM.

`configuration_vlm` (its config), `modeling_vlm` (the model), `processing_vlm` (the processor: `<image>` expansion,
chat-template label masking), `remote_code` (the flat code a saved folder carries), `lora` (LoRA presets scoped by
module path), `llava` (export to transformers' LLaVA), `towers` (vision towers from transformers folders),
`feature_cache` (cached features of a frozen tower), `tokenizer` (sentencepiece tokenizers trained on the data) and
`smollm` (the real LM: SmolLM2-135M-Instruct from its GGUF file).
"""

from .configuration_vlm import VisionLanguageConfig
from .modeling_vlm import VisionLanguageForConditionalGeneration
from .processing_vlm import VisionLanguageProcessor

__all__ = ["VisionLanguageConfig", "VisionLanguageForConditionalGeneration", "VisionLanguageProcessor"]
