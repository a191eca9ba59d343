"""--from npz: the original JAX checkpoints, google-research/vision_transformer (also the ResNet hybrids) and
big_vision."""

from __future__ import annotations

import re

import torch

from ..encoder.position_embeddings import infer_square_grid
from .engine import _Plan
from .timm import _is_square, _size

# JAX .npz: google-research/vision_transformer (vit_jax) and big_vision
#
# Checkpoint history, as big_vision's `vit.fix_old_checkpoints` tells it:
# - the paper's checkpoints (vit_jax) keep the position embedding in `Transformer/posembed_input/pos_embedding`, with
#   a row for [CLS]: [CLS] is concatenated first, then E_pos added. That is our convention, so it maps as is.
# - "widely used before 2022": `Transformer/pos_embedding`, same content.
# - big_vision since 2022: a top-level `pos_embedding` added to the patches only, then [CLS] concatenated: [CLS]
#   has no E_pos, which is a zero row in ours.
# - blocks are `encoderblock_N`, or one `encoderblock` with a leading depth axis (lax.scan); we unstack.
# - pre-linen names count modules of all types (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
#   MlpBlock_3`), linen ones count per type (`LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`).
# - MAP-head variants of the ViT-G era had the head's parameters inlined at the top level.
# Flax's `nn.gelu` is the tanh approximation, so these towers use hidden_act="gelu_pytorch_tanh".


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.T  # flax (in, out) -> torch (out, in)


def _qkv_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).T  # DenseGeneral (D, heads, head_dim) -> (heads * head_dim, D)


def _out_kernel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).T  # (heads, head_dim, D) -> (D, heads * head_dim)


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)  # (heads, head_dim) -> (D,)


_BLOCK = r"Transformer/encoderblock_(\d+)/"
_QKV = (("query", "q"), ("key", "k"), ("value", "v"))
_MHA = r"MultiHeadDotProductAttention_\d"
NPZ_RULES = [
    (r"cls", "embeddings.cls_token", None),
    (r"pos_embedding", "embeddings.position_embeddings", None),
    (r"embedding/kernel", "embeddings.patch_embeddings.projection.weight", lambda t: t.permute(3, 2, 0, 1)),  # HWIO
    (r"embedding/bias", "embeddings.patch_embeddings.projection.bias", None),
    (r"Transformer/encoder_norm/scale", "layernorm.weight", None),
    (r"Transformer/encoder_norm/bias", "layernorm.bias", None),
    (_BLOCK + r"LayerNorm_0/scale", r"layers.\1.layernorm_before.weight", None),
    (_BLOCK + r"LayerNorm_0/bias", r"layers.\1.layernorm_before.bias", None),
    (_BLOCK + r"LayerNorm_[12]/scale", r"layers.\1.layernorm_after.weight", None),
    (_BLOCK + r"LayerNorm_[12]/bias", r"layers.\1.layernorm_after.bias", None),
    *[(_BLOCK + _MHA + f"/{name}/kernel", rf"layers.\1.attention.{x}_proj.weight", _qkv_kernel) for name, x in _QKV],
    *[(_BLOCK + _MHA + f"/{name}/bias", rf"layers.\1.attention.{x}_proj.bias", _flatten) for name, x in _QKV],
    (_BLOCK + _MHA + r"/out/kernel", r"layers.\1.attention.o_proj.weight", _out_kernel),
    (_BLOCK + _MHA + r"/out/bias", r"layers.\1.attention.o_proj.bias", None),
    *[(_BLOCK + rf"MlpBlock_\d/Dense_{i}/kernel", rf"layers.\1.mlp.fc{i + 1}.weight", _dense) for i in (0, 1)],
    *[(_BLOCK + rf"MlpBlock_\d/Dense_{i}/bias", rf"layers.\1.mlp.fc{i + 1}.bias", None) for i in (0, 1)],
    (r"MAPHead_0/probe", "head.probe", None),
    (r"MAPHead_0/in_proj_(weight|bias)", r"head.attention.in_proj_\1", None),
    (r"MAPHead_0/" + _MHA + r"/out/kernel", "head.attention.out_proj.weight", _out_kernel),
    (r"MAPHead_0/" + _MHA + r"/out/bias", "head.attention.out_proj.bias", None),
    (r"MAPHead_0/LayerNorm_0/scale", "head.layernorm.weight", None),
    (r"MAPHead_0/LayerNorm_0/bias", "head.layernorm.bias", None),
    *[(rf"MAPHead_0/MlpBlock_0/Dense_{i}/kernel", f"head.mlp.fc{i + 1}.weight", _dense) for i in (0, 1)],
    *[(rf"MAPHead_0/MlpBlock_0/Dense_{i}/bias", f"head.mlp.fc{i + 1}.bias", None) for i in (0, 1)],
    (r"pre_logits/kernel", "pre_logits.0.weight", _dense),
    (r"pre_logits/bias", "pre_logits.0.bias", None),
    (r"head/kernel", "classifier.weight", _dense),
    (r"head/bias", "classifier.bias", None),
]


# The hybrids (Sec. 3.1: R50+ViT-B/16, R26+ViT-B/32, R50+ViT-L/32, and R+ViT-Ti/16, the root alone) run the ResNet of
# vit_jax/models_resnet.py before the patch embedding. It is transformers' BiT backbone with layer_type="bottleneck"
# (conv1x1-GN-ReLU, conv3x3 with the stride-GN-ReLU, conv1x1-GN, ReLU(shortcut + y); a projection conv1x1-GN on the
# first unit of each stage), global_padding="SAME" and a dynamically padded 3x3/2 max-pool after the 7x7/2 root conv,
# GN and ReLU. Two things differ, and both are made exact here:
# - weight standardisation: JAX's `StdConv` uses (w - mean) / (std + 1e-5), BiT's `WeightStandardizedConv2d`
#   (w - mean) / sqrt(var + 1e-8); it is a fixed function of the stored weight, so it is folded into the weight
#   (`fold_weight_standardization`);
# - GroupNorm epsilon: flax's `nn.GroupNorm` 1e-6, BiT's 1e-5: the config's `backbone_norm_eps`.
# The max-pool pads with 0 in BiT and with -inf in flax; it follows a ReLU, so every window's maximum is the same.
JAX_WS_EPS = 1e-5  # vit_jax models_resnet.StdConv: weight_standardize(kernel, axis=[0, 1, 2], eps=1e-5)
BIT_WS_EPS = 1e-8  # transformers' BiT builds every WeightStandardizedConv2d of the hybrid with eps=1e-8
JAX_GROUP_NORM_EPS = 1e-6  # flax nn.GroupNorm's default epsilon (32 groups, as BiT's num_groups)


def fold_weight_standardization(kernel: torch.Tensor) -> torch.Tensor:
    """A flax `StdConv` kernel (H, W, I, O) as the torch weight (O, I, H, W) whose BiT standardisation is JAX's.

    Per output channel, JAX uses J(w) = (w - mean) / (std + 1e-5), whose std is r = std / (std + 1e-5) < 1; BiT
    computes (v - mean) / sqrt(var + 1e-8) of its stored v. Storing v = k J(w) with k = sqrt(1e-8 / (1 - r^2))
    gives var(v) = k^2 r^2 and k / sqrt(k^2 r^2 + 1e-8) = 1, so BiT's standardised filter is J(w) exactly (up to
    the float32 rounding of v). A constant filter (std 0) has J = 0 and gives v = 0, which BiT also maps to 0. In
    float64, with 1 - r = 1e-5 / (std + 1e-5) formed directly so nothing cancels. Training the converted model
    further differentiates BiT's standardisation, not JAX's: only the function at conversion is the same.
    """
    weight = kernel.permute(3, 2, 0, 1).to(torch.float64)  # HWIO -> OIHW
    if not torch.isfinite(weight).all():
        raise ValueError(f"A ResNet kernel of shape {tuple(kernel.shape)} holds NaN or inf: a corrupt checkpoint.")
    flat = weight.reshape(weight.shape[0], -1)  # (O, H * W * I): JAX reduces over axes (0, 1, 2)
    std = flat.std(dim=1, unbiased=False, keepdim=True)  # jnp.std: the population std
    standardized = (flat - flat.mean(dim=1, keepdim=True)) / (std + JAX_WS_EPS)
    r, one_minus_r = std / (std + JAX_WS_EPS), JAX_WS_EPS / (std + JAX_WS_EPS)
    scale = torch.sqrt(BIT_WS_EPS / (one_minus_r * (1 + r)))  # k = sqrt(eps_bit / (1 - r^2))
    return (scale * standardized).reshape(weight.shape)


_BIT = "embeddings.patch_embeddings.backbone.bit."
_UNIT = r"ResNet/stages\.(\d+)\.layers\.(\d+)/"  # block{i}/unit{j} after `_normalise_npz`: 0-based
_GN = (("scale", "weight"), ("bias", "bias"))
NPZ_HYBRID_RULES = [
    (r"conv_root/kernel", _BIT + "embedder.convolution.weight", fold_weight_standardization),
    *[(rf"gn_root/{src}", _BIT + f"embedder.norm.{dst}", None) for src, dst in _GN],
    (_UNIT + r"conv([123])/kernel", _BIT + r"encoder.stages.\1.layers.\2.conv\3.weight", fold_weight_standardization),
    *[(_UNIT + rf"gn([123])/{src}", _BIT + rf"encoder.stages.\1.layers.\2.norm\3.{dst}", None) for src, dst in _GN],
    (
        _UNIT + r"conv_proj/kernel",
        _BIT + r"encoder.stages.\1.layers.\2.downsample.conv.weight",
        fold_weight_standardization,
    ),
    *[
        (_UNIT + rf"gn_proj/{src}", _BIT + rf"encoder.stages.\1.layers.\2.downsample.norm.{dst}", None)
        for src, dst in _GN
    ],
]


def _hybrid_backbone(source: dict[str, torch.Tensor]) -> dict:
    """The BiT backbone config of a hybrid `.npz` (keys normalised): units per stage and widths, from the weights."""
    units: dict[int, int] = {}
    for key in source:
        if match := re.match(_UNIT, key):
            stage, unit = int(match[1]), int(match[2])
            units[stage] = max(units.get(stage, 0), unit + 1)
    if sorted(units) != list(range(len(units))):
        raise ValueError(f"The ResNet stages of this hybrid .npz are not block1..blockN (found {sorted(units)}).")
    stages = range(len(units))
    return {
        "layer_type": "bottleneck",
        "depths": [units[i] for i in stages],
        "hidden_sizes": [int(_first(source, rf"ResNet/stages\.{i}\.layers\.0/conv3/kernel").shape[-1]) for i in stages],
        "embedding_size": int(source["conv_root/kernel"].shape[-1]),
        "global_padding": "SAME",
        "embedding_dynamic_padding": True,
        "out_features": [f"stage{len(units)}" if units else "stem"],
    }


def _check_bit_standardization(model: torch.nn.Module) -> None:
    """The fold assumes BiT's eps; refuse rather than convert inexactly if transformers ever changes it."""
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

    eps = {m.eps for m in model.modules() if isinstance(m, WeightStandardizedConv2d)}
    if eps != {BIT_WS_EPS}:
        raise ValueError(
            f"transformers' BiT standardises with eps {sorted(eps)}, but the hybrid conversion folds JAX's weight "
            f"standardisation for eps={BIT_WS_EPS}: update BIT_WS_EPS in vlm_vision/conversion/npz.py."
        )


def _normalise_npz(source: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint in the vit_jax naming with a top-level `pos_embedding`; see the history above."""
    source = {k.removeprefix("params/"): v for k, v in source.items()}
    for key in [k for k in source if re.match(r"block\d+/unit\d+/", k)]:  # the hybrid's ResNet stages, 0-based
        block, unit, rest = re.match(r"block(\d+)/unit(\d+)/(.*)", key).groups()
        source[f"ResNet/stages.{int(block) - 1}.layers.{int(unit) - 1}/{rest}"] = source.pop(key)
    layout = "big_vision"
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in source:
            source["pos_embedding"], layout = source.pop(old), "vision_transformer"
    if "pos_embedding" not in source:
        raise ValueError(
            f"No position embedding in this .npz (found keys such as {sorted(source)[:8]}): not a ViT checkpoint of "
            "the google-research/vision_transformer or big_vision layouts."
        )
    stacked = [k for k in source if k.startswith("Transformer/encoderblock/")]
    for key in stacked:  # lax.scan: one block with a leading depth axis
        value = source.pop(key)
        for depth in range(value.shape[0]):
            source[key.replace("encoderblock/", f"encoderblock_{depth}/")] = value[depth]
    if "probe" in source:  # ViT-G era: MAP head inlined
        for name in [k for k in source if k.split("/")[0] in ("probe", "MlpBlock_0", _MHA_0, "LayerNorm_0")]:
            source[f"MAPHead_0/{name}"] = source.pop(name)
    if "MAPHead_0/probe" in source:  # the head's q, k, v as nn.MultiheadAttention's packed in_proj
        mha = next(k.rsplit("/", 2)[0] for k in source if re.fullmatch(r"MAPHead_0/" + _MHA + r"/query/kernel", k))
        for kind, fn in (("kernel", _qkv_kernel), ("bias", _flatten)):
            parts = [fn(source.pop(f"{mha}/{name}/{kind}")) for name in ("query", "key", "value")]
            source[f"MAPHead_0/in_proj_{'weight' if kind == 'kernel' else 'bias'}"] = torch.cat(parts, dim=0)
    return source, layout


_MHA_0 = "MultiHeadDotProductAttention_0"


def _first(source: dict[str, torch.Tensor], pattern: str) -> torch.Tensor:
    key = next((k for k in source if re.fullmatch(pattern, k)), None)
    if key is None:
        raise ValueError(f"No key matching {pattern!r} in this .npz (found keys such as {sorted(source)[:8]}).")
    return source[key]


def _convert_npz(source, folder, overrides):
    source, layout = _normalise_npz(source)
    if "embedding/kernel" not in source:
        raise ValueError(f"No patch embedding `embedding/kernel` in this .npz (found {sorted(source)[:8]}).")
    kernel = source["embedding/kernel"]  # (P, P, C, D); for a hybrid, on the ResNet's feature map
    backbone = _hybrid_backbone(source) if "conv_root/kernel" in source else None
    # the pixel stride of one feature-map cell: the root is /4, each stage after the first /2
    stride = 4 * 2 ** max(len(backbone["depths"]) - 1, 0) if backbone is not None else 1
    patch = (kernel.shape[0] * stride, kernel.shape[1] * stride)
    query = _first(source, r"Transformer/encoderblock_0/" + _MHA + r"/query/kernel")  # (D, heads, head_dim)
    has_cls = "cls" in source
    pos = source["pos_embedding"]
    size = overrides.get("image_size")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        grid = (size[0] // patch[0], size[1] // patch[1])
        cls_row = has_cls and pos.shape[1] == grid[0] * grid[1] + 1
    else:
        cls_row = has_cls and _is_square(pos.shape[1] - 1) and not _is_square(pos.shape[1])
        grid = infer_square_grid(pos.shape[1] - int(cls_row))
    if has_cls and not cls_row:  # big_vision: [CLS] without position embedding
        source["pos_embedding"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    depth = 1 + max(int(m[1]) for k in source if (m := re.match(_BLOCK, k)))
    fields = {
        "hidden_size": kernel.shape[3],
        "num_hidden_layers": depth,
        "num_attention_heads": query.shape[1],
        "intermediate_size": _first(source, r"Transformer/encoderblock_0/MlpBlock_\d/Dense_0/bias").shape[0],
        "hidden_act": "gelu_pytorch_tanh",  # flax nn.gelu(approximate=True)
        "layer_norm_eps": 1e-6,  # flax nn.LayerNorm
        "image_size": _size(grid[0] * patch[0], grid[1] * patch[1]),
        "patch_size": _size(*patch),
        "num_channels": kernel.shape[2] if backbone is None else source["conv_root/kernel"].shape[2],
        "use_class_token": has_cls,
        "pooling": "map" if "MAPHead_0/probe" in source else ("cls" if has_cls else "mean"),
    }
    rules, notes = NPZ_RULES, []
    if backbone is not None:
        fields.update(backbone_config=backbone, backbone_norm_eps=JAX_GROUP_NORM_EPS)
        rules = NPZ_RULES + NPZ_HYBRID_RULES
        notes.append(
            f"Hybrid: the JAX ResNet (root + stages {backbone['depths']}) as transformers' BiT backbone, its weight "
            f"standardisation folded into the weights and GroupNorm eps {JAX_GROUP_NORM_EPS} (backbone_norm_eps)."
        )
    if "head/kernel" in source and source["head/kernel"].shape[-1] > 0:
        fields["num_labels"] = source["head/kernel"].shape[-1]
        if "pre_logits/kernel" in source:
            fields.update(classifier_head="mlp", representation_size=source["pre_logits/kernel"].shape[-1])
    elif "head/kernel" in source:  # a 0-class head: an empty array, nothing to convert
        source = {k: v for k, v in source.items() if not k.startswith("head/")}
    convention = "[CLS] with its E_pos row" if cls_row else ("[CLS] without E_pos" if has_cls else "no [CLS]")
    notes.insert(0, f"JAX .npz checkpoint, {layout} layout ({convention}).")
    return _Plan(fields, rules, {}, notes, source)
