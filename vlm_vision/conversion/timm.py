"""--from timm: timm VisionTransformer state dicts (fused qkv split into q/k/v)."""

from __future__ import annotations

import re

import torch

from ..encoder.position_embeddings import infer_square_grid
from .engine import _block_rules, _detect, _Plan
from .reading import _read_json

TIMM_LEAVES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
TIMM_RULES = [
    (r"cls_token", "embeddings.cls_token", None),
    (r"reg_token", "embeddings.register_tokens", None),
    (r"pos_embed", "embeddings.position_embeddings", None),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1", None),
    (r"norm_pre\.(weight|bias)", r"pre_layernorm.\1", None),
    # timm has one of `norm` (every token) and `fc_norm` (the pooled vector, final_norm="pooled")
    (r"(?:norm|fc_norm)\.(weight|bias)", r"layernorm.\1", None),
    # the fused projection holds [q; k; v] along the output dimension
    (
        r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
        (r"layers.\1.attention.q_proj.\2", r"layers.\1.attention.k_proj.\2", r"layers.\1.attention.v_proj.\2"),
        lambda t: t.chunk(3, dim=0),
    ),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"layers.\1.layer_scale\2.lambda1", None),
    *_block_rules(r"blocks\.(\d+)\.", TIMM_LEAVES),
    # AttentionPoolLatent ("map"): its q and kv projections are fused into in_proj_* beforehand (_fold_timm)
    (r"attn_pool\.latent", "head.probe", None),
    (r"attn_pool\.(in_proj_weight|in_proj_bias)", r"head.attention.\1", None),
    (r"attn_pool\.proj\.(weight|bias)", r"head.attention.out_proj.\1", None),
    (r"attn_pool\.norm\.(weight|bias)", r"head.layernorm.\1", None),
    (r"attn_pool\.mlp\.(fc1|fc2)\.(weight|bias)", r"head.mlp.\1.\2", None),
    (r"head\.(weight|bias)", r"classifier.\1", None),
]
# timm model names decode to a width; the head count is not in the weights.
TIMM_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}


def _timm_heads(config_json: dict | None, overrides: dict) -> int:
    if "num_attention_heads" in overrides:
        return overrides["num_attention_heads"]
    model_args = (config_json or {}).get("model_args") or {}
    if "num_heads" in model_args:
        return int(model_args["num_heads"])
    architecture = (config_json or {}).get("architecture", "")
    size = re.match(r"vit_([a-z]+)_", architecture)
    if size and size[1] in TIMM_HEADS:
        return TIMM_HEADS[size[1]]
    raise ValueError(
        "The number of attention heads of a timm checkpoint is not in its weights and could not be read from a "
        f"config.json (architecture={architecture!r}). Pass it: num_attention_heads=... (--num-heads on the CLI)."
    )


def _fold_timm(source: dict[str, torch.Tensor], grid: tuple[int, int] | None) -> tuple[dict, tuple[int, int], str]:
    """Bring timm's position-embedding conventions to ours (which are exact re-parameterisations).

    Ours: [CLS] + E_pos[0], registers without E_pos, patches + E_pos[1:]. timm either adds `pos_embed` to
    [CLS], registers and patches (the default), or only to the patches (`no_embed_class=True`, DINOv2/`reg` models).
    A register's position embedding is a constant added to a constant, so it is folded into the register token; a
    missing [CLS] row becomes a zero row. Returns the source in our convention, the patch grid and a note.
    """
    source = dict(source)
    pos = source["pos_embed"]
    has_cls = "cls_token" in source
    num_reg = source["reg_token"].shape[1] if "reg_token" in source else 0
    prefix = int(has_cls) + num_reg
    rows = pos.shape[1]
    if grid is not None:
        with_prefix = rows == grid[0] * grid[1] + prefix
    else:  # no image size given: the square reading wins
        with_prefix = prefix > 0 and _is_square(rows - prefix)
        grid = infer_square_grid(rows - prefix if with_prefix else rows)
    if rows - (prefix if with_prefix else 0) != grid[0] * grid[1]:
        raise ValueError(
            f"pos_embed has {rows} rows, which fits neither {grid} patches nor them plus {prefix} prefix rows."
        )
    note = (
        "timm `pos_embed` covers the prefix tokens"
        if with_prefix
        else "timm `no_embed_class`: no E_pos on prefix tokens"
    )
    patches = pos[:, prefix:] if with_prefix else pos
    cls_row = pos[:, :1] if with_prefix and has_cls else torch.zeros_like(pos[:, :1])
    if num_reg and with_prefix:
        source["reg_token"] = source["reg_token"] + pos[:, int(has_cls) : prefix]
    source["pos_embed"] = torch.cat([cls_row, patches], dim=1) if has_cls else patches
    if "attn_pool.q.weight" in source:  # nn.MultiheadAttention packs [q; k; v]; timm's kv is [k; v]
        for kind in ("weight", "bias"):
            q, kv = source.pop(f"attn_pool.q.{kind}"), source.pop(f"attn_pool.kv.{kind}")
            source[f"attn_pool.in_proj_{kind}"] = torch.cat([q, kv], dim=0)
    return source, grid, note


def _size(height: int, width: int) -> int | list[int]:
    return int(height) if height == width else [int(height), int(width)]


def _is_square(n: int) -> bool:
    try:
        infer_square_grid(n)
    except ValueError:
        return False
    return n > 0


def _convert_timm(source, folder, overrides):
    _detect(source, {"timm": r"blocks\.\d+\.attn\.qkv\.weight"}, "timm")
    config_json = _read_json(folder, "config.json") if folder is not None else None
    if config_json is not None and "architecture" not in config_json:
        config_json = None  # a config.json of another library
    pretrained = (config_json or {}).get("pretrained_cfg") or {}
    patch_weight = source["patch_embed.proj.weight"]  # (D, C, P, P)
    size = overrides.get("image_size") or (pretrained.get("input_size") or [None, None, None])[1:]
    grid = None
    if size and size[0]:
        size = (size, size) if isinstance(size, int) else tuple(size)
        grid = (size[0] // patch_weight.shape[2], size[1] // patch_weight.shape[3])
    source, grid, note = _fold_timm(source, grid)
    depth = 1 + max(int(k.split(".")[1]) for k in source if k.startswith("blocks."))
    model_args = (config_json or {}).get("model_args") or {}
    global_pool = model_args.get("global_pool", (config_json or {}).get("global_pool"))
    if "fc_norm.weight" in source:
        pooling, final_norm = "mean", "pooled"
    elif "attn_pool.latent" in source:
        pooling, final_norm = "map", "all"
    elif global_pool == "avg" or "cls_token" not in source:
        pooling, final_norm = "mean", "all"
    else:
        pooling, final_norm = "cls", "all"
    num_prefix = int("cls_token" in source) + (source["reg_token"].shape[1] if "reg_token" in source else 0)
    include_prefix = bool(model_args.get("pool_include_prefix", False))
    if num_prefix and pooling != "cls" and include_prefix != (pooling == "map"):
        # ours: the MAP head reads every token, the mean skips the prefix tokens
        raise ValueError(
            f"This timm model pools {pooling!r} with pool_include_prefix={include_prefix} over {num_prefix} prefix "
            "tokens; only a MAP head over all tokens or a mean over the patch tokens converts exactly."
        )
    fields = {
        "hidden_size": patch_weight.shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": _timm_heads(config_json, overrides),
        "intermediate_size": source["blocks.0.mlp.fc1.weight"].shape[0],
        "hidden_act": TIMM_ACTIVATIONS.get(model_args.get("act_layer", "gelu"), model_args.get("act_layer")),
        "layer_norm_eps": 1e-6,  # timm's ViT: partial(nn.LayerNorm, eps=1e-6)
        "image_size": _size(grid[0] * patch_weight.shape[2], grid[1] * patch_weight.shape[3]),
        "patch_size": _size(*patch_weight.shape[2:]),
        "num_channels": patch_weight.shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in source,
        "use_class_token": "cls_token" in source,
        "num_register_tokens": source["reg_token"].shape[1] if "reg_token" in source else 0,
        "pre_norm": "norm_pre.weight" in source,
        "layer_scale_init_value": 1.0 if "blocks.0.ls1.gamma" in source else None,
        "pooling": pooling,
        "final_norm": final_norm,
        "patch_embedding_bias": "patch_embed.proj.bias" in source,
    }
    if "head.weight" in source:
        fields["num_labels"] = source["head.weight"].shape[0]
    return _Plan(fields, TIMM_RULES, {}, [f"timm VisionTransformer state dict; {note}."], source)
