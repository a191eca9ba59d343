"""--from dinov2: transformers Dinov2Model and Dinov2WithRegistersModel (LayerScale, register tokens)."""

from __future__ import annotations

from .engine import _block_rules, _common_fields, _detect, _Plan, _transformers_vision_config
from .reading import _read_json
from .transformers_vit import MASK_TOKEN

DINOV2_LEAVES = {
    "norm1": "layernorm_before",
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "attention.q_proj": "attention.q_proj",
    "attention.k_proj": "attention.k_proj",
    "attention.v_proj": "attention.v_proj",
    "attention.o_proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
DINOV2_RULES = [
    (r"embeddings\.(cls_token|position_embeddings|register_tokens)", r"embeddings.\1", None),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1", None),
    (r"layernorm\.(weight|bias)", r"layernorm.\1", None),
    *_block_rules(r"encoder\.layer\.(\d+)\.", DINOV2_LEAVES),
    *_block_rules(
        r"encoder\.layer\.(\d+)\.", {"layer_scale1": "layer_scale1", "layer_scale2": "layer_scale2"}, r"(lambda1)"
    ),
]
DINOV2_LAYOUTS = {"dinov2": r"encoder\.layer\.\d+\.norm1\.weight"}


def _convert_dinov2(source, folder, overrides):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    raw = _read_json(folder, "config.json") if folder is not None else None
    registers = raw is not None and raw.get("model_type") == "dinov2_with_registers"
    cfg = _transformers_vision_config(folder, Dinov2WithRegistersConfig if registers else Dinov2Config, None, "dinov2")
    _detect(source, DINOV2_LAYOUTS, "dinov2")
    if getattr(cfg, "use_swiglu_ffn", False):
        raise ValueError("use_swiglu_ffn=True (DINOv2 giant) has a SwiGLU MLP, which this model does not implement.")
    fields = {
        **_common_fields(cfg),
        "qkv_bias": cfg.qkv_bias,
        # transformers' DINOv2 sizes its MLP by mlp_ratio and ignores intermediate_size
        "intermediate_size": int(cfg.hidden_size * cfg.mlp_ratio),
        "layer_scale_init_value": float(cfg.layerscale_value),
        "num_register_tokens": getattr(cfg, "num_register_tokens", 0),
    }
    variant = "WithRegisters" if registers else ""
    notes = [f"DINOv2{' with registers' if registers else ''} (transformers Dinov2{variant}Model)."]
    return _Plan(fields, DINOV2_RULES, MASK_TOKEN, notes, source)
