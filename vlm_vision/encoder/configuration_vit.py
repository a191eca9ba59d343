"""Configuration of the Vision Transformer (Dosovitskiy et al., 2020, arXiv 2010.11929) and its named presets.

The defaults are ViT-B/16 at 224 x 224. Presets are data, decoded from a name like big_vision does ("B/16" ->
width 768, depth 12, 12 heads, MLP 3072, patch 16): see `PRESET_SIZES` and `VisionTransformerConfig.from_preset`.

Every field is checked when a config is made, when `from_pretrained` overrides set fields afterwards, when a model
is built and when the config is saved: a wrong value raises ValueError with the value and the fix, an unknown field
name (a typo such as `image_sise`) raises TypeError listing the valid names.

This file imports only torch, transformers and a sibling file: it is copied into saved checkpoints for
`trust_remote_code` users.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence

from transformers import PretrainedConfig

from .position_embeddings import INTERPOLATION_MODES

# Table 1 of the paper: (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size); the Ti and S rows
# are DeiT's, as in the reference code.
PRESET_SIZES = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "h": (1280, 32, 16, 5120),
}

# The hybrid of Sec. 3.1 / Table 1: a ResNet-50 whose stage 4 is removed and whose stage 3 has 9 blocks instead of 6,
# so it keeps the number of layers and outputs a stride-16 feature map; the "patches" are 1x1 on that map. Built
# with transformers' BiT backbone (weight-standardised convolutions and GroupNorm, as the reference ResNet).
R50_BACKBONE_CONFIG = {
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "hidden_sizes": [256, 512, 1024, 2048],
    "global_padding": "SAME",
    "embedding_dynamic_padding": True,
    "out_features": ["stage3"],
}
HYBRID_BACKBONES = {"r50": R50_BACKBONE_CONFIG}

_PRESET_PATTERN = re.compile(r"^(?:(?P<backbone>r50)-)?vit-(?P<size>ti|s|b|l|h)(?P<patch>\d+)$")
PRESET_NAMES = ("vit-ti16", "vit-s16", "vit-b16", "vit-b32", "vit-l16", "vit-l32", "vit-h14", "r50-vit-b16")

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new")
POOLING_TYPES = ("cls", "mean", "map")
FINAL_NORMS = ("all", "pooled")
POOLER_ACTIVATIONS = ("tanh", *ACTIVATIONS)
CLASSIFIER_HEADS = ("linear", "mlp")


# Keys transformers itself passes to every config besides the dataclass fields, or that configs saved by it carry:
# bookkeeping written into config.json, loading options, the `PretrainedConfig` arguments of transformers 4 and the
# generation parameters older configs hold (transformers drops those). Any other name is refused as a typo.
TRANSFORMERS_CONFIG_KWARGS = frozenset(
    {
        "model_type", "auto_map", "_name_or_path", "name_or_path", "_commit_hash", "num_labels", "torch_dtype",
        "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config",
        "_attn_implementation_internal", "_experts_implementation_internal", "_attn_implementation_autoset",
        "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "is_decoder",
        "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task",
        "task_specific_params", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
        "sep_token_id", "decoder_start_token_id", "use_return_dict",
    }
)  # fmt: skip
# transformers model types the package's converters read (`--from`), for a config of one of them loaded as ours.
CONVERTIBLE_MODEL_TYPES = {
    "vit": "hf",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}
# What `from_pretrained` may hand to `from_dict` besides config fields (internal flags, loading options).
_LOADING_KWARGS = frozenset({"_from_auto", "_from_pipeline", "trust_remote_code", "code_revision", "gguf_file"})


def config_field_names(config_class, extra: Sequence[str] = ()) -> list[str]:
    """The names of a config class's own fields (not transformers' shared ones), and `extra` (names it takes that
    are not fields)."""
    shared = set(PretrainedConfig.__dataclass_fields__)
    return [name for name in config_class.__dataclass_fields__ if name not in shared] + list(extra)


def unknown_kwargs(kwargs) -> list[str]:
    """The names among `kwargs` that neither transformers' configs nor older configs' generation parameters use."""
    return sorted(set(kwargs) - TRANSFORMERS_CONFIG_KWARGS - _generation_parameters() - _LOADING_KWARGS)


def unknown_fields_message(config_class, unknown: list[str], extra: Sequence[str] = ()) -> str:
    """`config_class has no field 'hiden_size' (did you mean 'hidden_size'?)`, with the fields it has."""
    known = config_field_names(config_class, extra)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known + sorted(PretrainedConfig.__dataclass_fields__), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"{config_class.__name__} has no field {', '.join(hints)}. Its fields are: {', '.join(known)}; "
        "transformers' own (id2label, label2id, num_labels, dtype, return_dict, output_hidden_states, "
        "attn_implementation, ...) are accepted too."
    )


def _generation_parameters() -> frozenset[str]:
    try:
        from transformers import GenerationConfig

        return frozenset(GenerationConfig._get_default_generation_params())
    except (ImportError, AttributeError):  # a transformers without this helper: nothing more is accepted
        return frozenset()


def _pair(value: int | list[int] | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (height, width), got {value!r}.")
    return pair


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class VisionTransformerConfig(PretrainedConfig):
    r"""Configuration of [`VisionTransformerModel`]: the ViT of *An Image is Worth 16x16 Words*, plus the switches that
    real vision towers need (CLIP, SigLIP, DINOv2).

    Args:
        hidden_size: D, the width of every token.
        num_hidden_layers: L, the number of Transformer blocks.
        num_attention_heads: heads of each multi-head self-attention; must divide `hidden_size`.
        intermediate_size: hidden width of the two-layer MLP of each block.
        hidden_act: MLP non-linearity: `"gelu"` (exact, the paper), `"quick_gelu"` (OpenAI CLIP),
            `"gelu_pytorch_tanh"` (SigLIP, the tanh approximation), `"gelu_new"`.
        hidden_dropout_prob, attention_probs_dropout_prob: dropout after the MLP/attention outputs and on the
            attention weights.
        initializer_range: std of the truncated normal init of weights and embeddings.
        layer_norm_eps: epsilon of every LayerNorm (1e-6 as in the reference code; transformers' ViT uses 1e-12).
        image_size: `H` or `(H, W)` in pixels the position embeddings are made for.
        patch_size: `P` or `(P_h, P_w)`: the pixel stride of one token. For the hybrid, the stride of one feature-map
            cell (16 for R50), the patches on the feature map being 1x1.
        num_channels: input channels C.
        qkv_bias: bias in the query/key/value projections.
        use_class_token: prepend the learnable [CLS] token x_class (Eq. 1). SigLIP has none.
        num_register_tokens: learnable "register" tokens (Darcet et al., 2023) inserted after [CLS]; they carry no
            position embedding, as in DINOv2 with registers.
        pre_norm: a LayerNorm on the embeddings before the first block (CLIP's `pre_layrnorm`).
        layer_scale_init_value: when set, each residual branch is scaled by a learnable per-channel vector initialised
            to this value (CaiT / DINOv2 LayerScale).
        pooling: what `pooler_output` is: `"cls"` = LN(z_L^0) (Eq. 4), `"mean"` = mean of the normalised patch
            tokens, `"map"` = a multi-head attention-pooling head with a learned probe (SigLIP, big_vision "map").
        final_norm: where the final LayerNorm goes: `"all"` (the paper, DINOv2, SigLIP) normalises every token, so
            `last_hidden_state` is LN(z_L); `"pooled"` (CLIP's `post_layernorm`, timm's `fc_norm`) normalises only the
            pooled vector, so `last_hidden_state` is the raw last block output z_L and `pooler_output` is
            LN(z_L^0) (`cls`) or LN(mean of the patch tokens) (`mean`). Not with `pooling="map"`.
        pooler_act: when set (e.g. `"tanh"`), `pooler_output` goes through one more D x D dense layer and this
            activation: transformers' `ViTModel` pooler, which holds the pre-logits layer of the ImageNet-21k
            checkpoints. None (default): no such layer.
        patch_embedding_bias: bias in the patch projection E (CLIP's has none).
        classifier_head: for image classification: `"mlp"` is the pre-training head (hidden layer of
            `representation_size` with tanh, then linear), `"linear"` the fine-tuning head (one zero-initialised
            D x K layer).
        representation_size: width of the pre-training head's hidden layer (defaults to `hidden_size`).
        backbone_config: keyword arguments of a transformers `BitConfig` for the hybrid (Sec. 3.1); None for the
            plain patch embedding. See `R50_BACKBONE_CONFIG`.
        backbone_norm_eps: when set, the epsilon of every GroupNorm of the hybrid's backbone (transformers' BiT uses
            1e-5; the reference JAX ResNet, flax `nn.GroupNorm`, 1e-6: the converted `.npz` hybrids set 1e-6). None
            (default): BiT's own. Only with `backbone_config`.
        interpolation_mode, interpolation_antialias: how position embeddings are resampled to another grid, at run
            time and when a checkpoint is loaded at another `image_size` (see `resample_position_embeddings`).
    """

    model_type = "vlm_vit"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] = 224
    patch_size: int | list[int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    use_class_token: bool = True
    num_register_tokens: int = 0
    pre_norm: bool = False
    layer_scale_init_value: float | None = None
    pooling: str = "cls"
    final_norm: str = "all"
    pooler_act: str | None = None
    patch_embedding_bias: bool = True
    classifier_head: str = "linear"
    representation_size: int | None = None
    backbone_config: dict | None = None
    backbone_norm_eps: float | None = None
    interpolation_mode: str = "bicubic"
    interpolation_antialias: bool = False

    def __post_init__(self, **kwargs):
        for name in ("id2label", "label2id"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, e.g. {{0: 'cat', 1: 'dog'}}, got {getattr(self, name)!r}.")
        unknown = sorted(set(kwargs) - TRANSFORMERS_CONFIG_KWARGS - _generation_parameters())
        if unknown:
            raise TypeError(self._unknown_fields_message(unknown))
        num_labels = kwargs.get("num_labels")  # transformers turns a negative count into 0 labels
        if num_labels is not None and (
            isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0
        ):
            raise ValueError(
                f"num_labels must be an int >= 0 (0: a classifier without its last layer), got {num_labels!r}."
            )
        super().__post_init__(**kwargs)
        self.check_fields()

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of this config's own fields (those of the ViT, not transformers' shared ones)."""
        return config_field_names(cls)

    @classmethod
    def _unknown_fields_message(cls, unknown: list[str]) -> str:
        return unknown_fields_message(cls, unknown)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`, which sets `from_pretrained`'s overrides after the config is made: they are
        checked here as a whole, and an override that names no field is refused instead of dropped."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            source = CONVERTIBLE_MODEL_TYPES.get(model_type)
            raise ValueError(
                f"This is a {model_type!r} config, not a {cls.model_type!r} one: "
                + (
                    f"convert the checkpoint first (vlm-vision-convert --from {source} SRC --out DIR), or load it "
                    "with transformers' Auto classes."
                    if source
                    else "load it with transformers' Auto classes (AutoConfig / AutoModel)."
                )
            )
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        config.check_fields()
        if return_unused_kwargs:  # a model's from_pretrained: the model refuses what its config did not take
            return config, unused
        unknown = sorted(set(unused) - _LOADING_KWARGS)
        if unknown:
            raise TypeError(cls._unknown_fields_message(unknown))
        return config

    def validate(self) -> None:
        """transformers' checks, then ours (`check_fields`); `save_pretrained` calls this before writing."""
        super().validate()
        self.check_fields()

    def check_fields(self) -> None:
        """Check every field of the ViT (at creation, after `from_pretrained` overrides, when a model is built).

        Raises:
            ValueError: a value the model cannot be built with, naming it and the fix.
        """
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}: "
                "choose a head count that divides the width (head_dim = hidden_size / num_attention_heads)."
            )
        image, patch = _pair(self.image_size, "image_size"), _pair(self.patch_size, "patch_size")
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}: use an image size "
                "that is a multiple of the patch size."
            )
        if isinstance(self.num_register_tokens, bool) or not isinstance(self.num_register_tokens, int):
            raise ValueError(f"num_register_tokens must be an int >= 0, got {self.num_register_tokens!r}.")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}.")
        for name in ("qkv_bias", "use_class_token", "pre_norm", "patch_embedding_bias", "interpolation_antialias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {ACTIVATIONS}.")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling={self.pooling!r} is not supported; use one of {POOLING_TYPES}.")
        if self.pooling == "cls" and not self.use_class_token:
            raise ValueError('pooling="cls" needs use_class_token=True; use pooling="mean" or "map" without it.')
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm={self.final_norm!r} is not supported; use one of {FINAL_NORMS}.")
        if self.final_norm == "pooled" and self.pooling == "map":
            raise ValueError(
                'final_norm="pooled" normalises the pooled vector of pooling="cls" or "mean"; the attention-pooling '
                'head ("map") reads normalised tokens: use final_norm="all" with it.'
            )
        if self.pooler_act is not None and self.pooler_act not in POOLER_ACTIVATIONS:
            raise ValueError(
                f"pooler_act={self.pooler_act!r} is not supported; use None or one of {POOLER_ACTIVATIONS}."
            )
        if self.classifier_head not in CLASSIFIER_HEADS:
            raise ValueError(f"classifier_head={self.classifier_head!r} is not supported; use {CLASSIFIER_HEADS}.")
        if self.representation_size is not None and not _is_positive_int(self.representation_size):
            raise ValueError(f"representation_size must be None or a positive int, got {self.representation_size!r}.")
        if self.layer_scale_init_value is not None and not _is_number(self.layer_scale_init_value):
            raise ValueError(
                "layer_scale_init_value must be None or a number (DINOv2 uses 1.0), got "
                f"{self.layer_scale_init_value!r}."
            )
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0 or (name == "layer_norm_eps" and value == 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}.")
        if self.backbone_config is not None:
            self._check_backbone_config()
        if self.backbone_norm_eps is not None:
            if not (_is_number(self.backbone_norm_eps) and self.backbone_norm_eps > 0):
                raise ValueError(f"backbone_norm_eps must be None or a positive float, got {self.backbone_norm_eps!r}.")
            if self.backbone_config is None:
                raise ValueError(
                    f"backbone_norm_eps={self.backbone_norm_eps} sets the GroupNorm epsilon of the hybrid's backbone, "
                    "but backbone_config is None (no backbone): set backbone_config or leave backbone_norm_eps None."
                )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        if self.interpolation_mode not in INTERPOLATION_MODES:
            raise ValueError(
                f"interpolation_mode={self.interpolation_mode!r} is not supported; use one of {INTERPOLATION_MODES}."
            )
        if self.interpolation_antialias and self.interpolation_mode not in ("bilinear", "bicubic"):
            raise ValueError(
                f"interpolation_antialias=True needs interpolation_mode 'bilinear' or 'bicubic', got "
                f"{self.interpolation_mode!r}."
            )
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ValueError(
                f"num_labels must be an int >= 0 (0: a classifier without its last layer), got {self.num_labels!r}."
            )

    def _check_backbone_config(self) -> None:
        from transformers import BitConfig

        if not isinstance(self.backbone_config, dict):
            raise ValueError(
                f"backbone_config must be None or a dict of BitConfig arguments (see R50_BACKBONE_CONFIG), got "
                f"{type(self.backbone_config).__name__}."
            )
        shared = set(PretrainedConfig.__dataclass_fields__)
        known = {k for k in BitConfig.__dataclass_fields__ if not k.startswith("_") and k not in shared}
        known = (known - {"num_channels"}) | {"out_features", "out_indices"}
        unknown = sorted(set(self.backbone_config) - known)
        if unknown:
            raise ValueError(
                f"backbone_config has unknown keys {unknown} (num_channels is the model's own): BitConfig takes "
                f"{sorted(known)}."
            )
        try:
            BitConfig(num_channels=self.num_channels, **self.backbone_config)
        except Exception as error:  # BitConfig's strict field validation
            raise ValueError(f"backbone_config is not a valid BitConfig ({error}).") from error

    @property
    def image_size_hw(self) -> tuple[int, int]:
        return _pair(self.image_size, "image_size")

    @property
    def patch_size_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size, "patch_size")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid at `image_size`."""
        (h, w), (ph, pw) = self.image_size_hw, self.patch_size_hw
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        """N = HW / P^2 at `image_size`."""
        grid_h, grid_w = self.grid_size
        return grid_h * grid_w

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the sequence: [CLS] (if any), then the registers."""
        return int(self.use_class_token) + self.num_register_tokens

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VisionTransformerConfig:
        """A config from a preset name such as `"vit-b16"`, `"vit-l32"`, `"vit-h14"` or `"r50-vit-b16"`.

        Any `vit-{ti,s,b,l,h}{patch}` decodes (so `"vit-b8"` works too). Keyword arguments override fields, e.g.
        `from_preset("vit-b16", image_size=384, num_labels=10)`.
        """
        if not isinstance(name, str):
            raise TypeError(f"A preset name is a string such as 'vit-b16', got {type(name).__name__}.")
        match = _PRESET_PATTERN.match(name.lower().replace("/", ""))
        if match is None:
            raise ValueError(
                f"Unknown preset {name!r}. Presets are vit-{{ti,s,b,l,h}}{{patch}} (e.g. {', '.join(PRESET_NAMES)})."
            )
        hidden, layers, heads, mlp = PRESET_SIZES[match["size"]]
        fields = {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": mlp,
            "patch_size": int(match["patch"]),
        }
        if match["backbone"]:
            fields["backbone_config"] = dict(HYBRID_BACKBONES[match["backbone"]])
        fields.update(overrides)
        return cls(**fields)


__all__ = ["PRESET_NAMES", "PRESET_SIZES", "VisionTransformerConfig"]
