"""--from hf: transformers ViTModel / ViTForImageClassification, v5 names and the v4-era names on disk."""

from __future__ import annotations

from .engine import _block_rules, _common_fields, _detect, _Plan, _transformers_vision_config

HF_VIT_V4_LEAVES = {
    "layernorm_before": "layernorm_before",
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "layernorm_after": "layernorm_after",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
HF_VIT_V5_LEAVES = {name: name for name in HF_VIT_V4_LEAVES.values()}
HF_VIT_STEM = [
    (r"(?:vit\.)?embeddings\.(cls_token|position_embeddings)", r"embeddings.\1", None),
    (
        r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)",
        r"embeddings.patch_embeddings.projection.\1",
        None,
    ),
    (r"(?:vit\.)?layernorm\.(weight|bias)", r"layernorm.\1", None),
    (r"(?:vit\.)?pooler\.dense\.(weight|bias)", r"pooler.dense.\1", None),
    (r"classifier\.(weight|bias)", r"classifier.\1", None),
]
HF_VIT_LAYOUTS = {
    "v4": r"(?:vit\.)?encoder\.layer\.\d+\.attention\.attention\.query\.weight",
    "v5": r"(?:vit\.)?layers\.\d+\.attention\.q_proj\.weight",
}
# ViTForMaskedImageModeling's [MASK] embedding: an input for masked pre-training, not used on images.
MASK_TOKEN = {r"(?:vit\.)?embeddings\.mask_token": "masked-image-modelling [MASK] token, unused on real images"}


def _convert_hf(source, folder, overrides):
    from transformers import ViTConfig

    cfg = _transformers_vision_config(folder, ViTConfig, None, "hf")
    layout = _detect(source, HF_VIT_LAYOUTS, "hf")
    block = r"(?:vit\.)?encoder\.layer\.(\d+)\." if layout == "v4" else r"(?:vit\.)?layers\.(\d+)\."
    rules = HF_VIT_STEM + _block_rules(block, HF_VIT_V4_LEAVES if layout == "v4" else HF_VIT_V5_LEAVES)
    fields = {**_common_fields(cfg), "qkv_bias": cfg.qkv_bias}
    if any(k.endswith("pooler.dense.weight") for k in source):
        if getattr(cfg, "pooler_output_size", cfg.hidden_size) != cfg.hidden_size:
            raise ValueError(
                f"The source pooler projects to pooler_output_size={cfg.pooler_output_size} != hidden_size="
                f"{cfg.hidden_size}; only a D x D pooler converts exactly."
            )
        fields["pooler_act"] = getattr(cfg, "pooler_act", "tanh")
    if "classifier.weight" in source:
        fields.update(num_labels=source["classifier.weight"].shape[0], id2label=cfg.id2label)
    return _Plan(fields, rules, MASK_TOKEN, [f"transformers ViT checkpoint ({layout} parameter names)."], source)
