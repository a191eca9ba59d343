"""--from clip: transformers CLIPVisionModel, or the vision tower of a CLIPModel folder."""

from __future__ import annotations

from .engine import _as_table, _as_token, _block_rules, _common_fields, _detect, _Plan, _transformers_vision_config

CLIP_LEAVES = {
    "layer_norm1": "layernorm_before",
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.o_proj",
    "layer_norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VM = r"(?:vision_model\.)?"
CLIP_RULES = [
    (_VM + r"embeddings\.class_embedding", "embeddings.cls_token", _as_token),
    (_VM + r"embeddings\.position_embedding\.weight", "embeddings.position_embeddings", _as_table),
    (_VM + r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1", None),
    (_VM + r"pre_layrnorm\.(weight|bias)", r"pre_layernorm.\1", None),
    (_VM + r"post_layernorm\.(weight|bias)", r"layernorm.\1", None),
    # SigLIP's attention-pooling head has our head's names already
    (_VM + r"head\.(probe|attention\.in_proj_(?:weight|bias))", r"head.\1", None),
    (_VM + r"head\.(attention\.out_proj|layernorm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"head.\1.\2", None),
    *_block_rules(_VM + r"encoder\.layers\.(\d+)\.", CLIP_LEAVES),
]
# A full CLIPModel / SiglipModel folder also holds the text tower and the contrastive projections.
NOT_THE_VISION_TOWER = {
    r"text_model\..*": "text tower",
    r"(visual_projection|text_projection)\.weight": "contrastive projection (not part of the vision tower)",
    r"logit_(scale|bias)": "contrastive temperature / bias",
    # checkpoints written before transformers 4.31 saved this arange buffer
    _VM + r"embeddings\.position_ids": "position-index buffer (an arange), not a weight",
}
CLIP_LAYOUTS = {"clip": _VM + r"encoder\.layers\.\d+\.self_attn\.q_proj\.weight"}


def _convert_clip(source, folder, overrides):
    from transformers import CLIPConfig, CLIPVisionConfig

    cfg = _transformers_vision_config(folder, CLIPVisionConfig, CLIPConfig, "clip")
    _detect(source, {**CLIP_LAYOUTS, "clip [CLS]": _VM + r"embeddings\.class_embedding"}, "clip")
    if not any(k.endswith("embeddings.class_embedding") for k in source):
        raise ValueError("These weights have no class_embedding: a SigLIP tower? Use --from siglip.")
    # CLIP: pre-LN on the embeddings; `post_layernorm` only on the pooled [CLS], last_hidden_state is un-normalised;
    # the patch projection has no bias.
    fields = {
        **_common_fields(cfg),
        "pre_norm": True,
        "final_norm": "pooled",
        "patch_embedding_bias": False,
    }
    return _Plan(
        fields, CLIP_RULES, NOT_THE_VISION_TOWER, ["CLIP vision tower (transformers CLIPVisionModel)."], source
    )
