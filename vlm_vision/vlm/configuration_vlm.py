"""Configuration of the vision-language model: vision tower + projection adapter + causal language model."""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..adapters import ADAPTER_CLASSES, adapter_config_from_dict
from ..encoder.configuration_vit import VisionTransformerConfig, unknown_fields_message, unknown_kwargs

# The vision sub-config is found by its model type. The package registers it on import; a folder loaded as remote
# code without the package has only its copy, registered here (never over the package's own).
if VisionTransformerConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(VisionTransformerConfig.model_type, VisionTransformerConfig)

# Tokens before the patch tokens in the sequences of towers that don't say so in their config. Our own tower reports
# `num_prefix_tokens`; transformers' DINOv2 with registers reports `num_register_tokens` (plus its [CLS]).
PREFIX_TOKENS_BY_MODEL_TYPE = {
    "clip_vision_model": 1,
    "siglip_vision_model": 0,
    "siglip2_vision_model": 0,
    "vit": 1,
    "dinov2": 1,
}


# transformers towers that take only patchified NaFlex inputs (pixel_values (I, N, C*P*P), pixel_attention_mask,
# spatial_shapes) and have a square position table of `num_patches` instead of an image size
NAFLEX_VISION_MODEL_TYPES = ("siglip2_vision_model",)


def vision_prefix_tokens(vision_config: PretrainedConfig) -> int:
    """How many [CLS]/register tokens come before the patch tokens in the tower's hidden states."""
    if hasattr(vision_config, "num_prefix_tokens"):
        return vision_config.num_prefix_tokens
    if vision_config.model_type == "dinov2_with_registers":
        return 1 + vision_config.num_register_tokens
    if vision_config.model_type in PREFIX_TOKENS_BY_MODEL_TYPE:
        return PREFIX_TOKENS_BY_MODEL_TYPE[vision_config.model_type]
    raise ValueError(
        f"Unknown vision tower type {vision_config.model_type!r}: set num_vision_prefix_tokens in the "
        "VisionLanguageConfig to the number of tokens before its patch tokens (1 for a [CLS] token, 0 for none)."
    )


def vision_patch_size(vision_config: PretrainedConfig) -> tuple[int, int]:
    patch = vision_config.patch_size
    return (patch, patch) if isinstance(patch, int) else tuple(patch)


# LLaVA's config names (transformers' `LlavaConfig`) and what they set here: the strategy is `keep_prefix_tokens`,
# the projector's activation and bias are the mlp adapter's `hidden_act` and `bias`.
VISION_FEATURE_SELECT_STRATEGIES = ("default", "full")
LLAVA_PROJECTOR_FIELDS = {"projector_hidden_act": "hidden_act", "multimodal_projector_bias": "bias"}
LLAVA_NAMES = ("vision_feature_select_strategy", *LLAVA_PROJECTOR_FIELDS)
LLAVA_PROJECTOR_ADAPTERS = {"projector_hidden_act": ("mlp",), "multimodal_projector_bias": ("mlp", "linear")}


class VisionLanguageConfig(PretrainedConfig):
    r"""Configuration of [`VisionLanguageForConditionalGeneration`].

    Args:
        vision_config: config of the vision tower: ours (`vlm_vit`, the default) or any vision model registered with
            `AutoModel` (CLIP, SigLIP, DINOv2 vision configs).
        text_config: config of the causal language model (any `AutoModelForCausalLM` type; default a Llama).
        adapter_config: the projection adapter (`vlm_vision.adapters`), e.g. `{"adapter_type": "mlp"}`; its
            `vision_hidden_size` (tower width x number of feature layers) and `text_hidden_size` are filled in.
        image_token_id: id of the `<image>` placeholder token in the tokenizer.
        vision_feature_layer: hidden-state index of the tower to use (transformers' convention: -2 = penultimate
            block, as LLaVA), or a list of indices concatenated on channels. Only the tower's blocks up to the deepest
            one run (for our tower; other towers run whole).
        keep_prefix_tokens: keep the tower's [CLS]/register tokens as image tokens too (LLaVA's "full" strategy);
            by default only patch tokens are kept ("default"). A tower without prefix tokens keeps all its tokens
            either way. Needs an adapter that projects prefix tokens: linear, mlp (each token on its own) or
            pixel_shuffle (each prefix token tiled over a block).
        num_vision_prefix_tokens: override for towers whose prefix-token count cannot be read from their config.
        tile_separator_token_ids: `[column_separator_id, row_separator_id]`, the tokens between tiles of one row and
            after each row of tiles in image-splitting mode (the processor's `image_mode="tiles"`, which adds them to
            the tokenizer); the model checks each split image's layout with them. None when tiles are not used.

    LLaVA's names (transformers' `LlavaConfig`) are taken as LLaVA defines them, as arguments and as attributes;
    none is stored twice:
        vision_feature_select_strategy: "default" drops the tower's [CLS]/prefix tokens (`keep_prefix_tokens=False`;
            LLaVA drops exactly one, the [CLS]; here registers go too), "full" keeps them (`keep_prefix_tokens=True`).
            A tower without prefix tokens is "full" (LLaVA's "default" would drop a patch token: refused).
        projector_hidden_act: the activation of the mlp adapter (LLaVA's two-layer projector), `adapter_config`'s
            `hidden_act`; other adapters have no such activation, and refuse it.
        multimodal_projector_bias: the mlp or linear adapter's `bias`.
    """

    model_type = "vlm_vision"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vlm_vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    adapter_config: dict | None = None
    image_token_id: int | None = None
    vision_feature_layer: int | list[int] = -2
    keep_prefix_tokens: bool = False
    num_vision_prefix_tokens: int | None = None
    tile_separator_token_ids: list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        llava = {name: kwargs.pop(name) for name in LLAVA_NAMES if name in kwargs}
        unknown = unknown_kwargs(kwargs)
        if unknown:  # a misspelt field would be kept as an attribute nothing reads
            raise TypeError(unknown_fields_message(type(self), unknown, LLAVA_NAMES))
        super().__post_init__(**kwargs)
        strategy = llava.pop("vision_feature_select_strategy", None)
        if strategy is not None:
            if strategy == "default" and self.keep_prefix_tokens:
                raise ValueError(
                    'vision_feature_select_strategy="default" (drop the prefix tokens) contradicts '
                    'keep_prefix_tokens=True: give one of them ("full" is keep_prefix_tokens=True).'
                )
            self._check_strategy(strategy)
            self.keep_prefix_tokens = strategy == "full"
        layers = self.feature_layers
        if not layers or not all(isinstance(i, int) for i in layers):
            raise ValueError(
                f"vision_feature_layer must be an int or a list of ints, got {self.vision_feature_layer!r}."
            )
        num_states = self.vision_config.num_hidden_layers + 1
        if any(not -num_states <= i < num_states for i in layers):
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is out of range for a tower with "
                f"{self.vision_config.num_hidden_layers} layers (indices {-num_states}..{num_states - 1})."
            )
        adapter = {"adapter_type": "mlp", **(self.adapter_config or {})}
        adapter["vision_hidden_size"] = self.vision_config.hidden_size * len(layers)
        adapter["text_hidden_size"] = self.text_config.hidden_size
        self.adapter_config = adapter_config_from_dict(adapter).to_dict()  # validates
        for name, value in llava.items():
            setattr(self, name, value)
        self._check_prefix_support()
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the language model's vocabulary "
                f"(vocab_size={self.text_config.vocab_size}): resize the embeddings after adding <image>."
            )
        separators = self.tile_separator_token_ids
        if separators is not None and (
            not isinstance(separators, (list, tuple))
            or len(separators) != 2
            or not all(isinstance(i, int) and 0 <= i < self.text_config.vocab_size for i in separators)
        ):
            raise ValueError(
                f"tile_separator_token_ids={separators!r} must be [column_separator_id, row_separator_id], two token "
                f"ids of the language model's vocabulary (vocab_size={self.text_config.vocab_size}): take them from "
                "the processor (processor.tile_separator_token_ids) after it added its separator tokens."
            )
        if separators is not None:
            self.tile_separator_token_ids = list(separators)
        # tie the LM head like the text config says (transformers keeps the flag on the text config for most LMs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def _check_prefix_support(self) -> None:
        adapter_type = self.adapter_config["adapter_type"]
        if self.keep_prefix_tokens and not ADAPTER_CLASSES[adapter_type].supports_prefix_tokens:
            able = sorted(name for name, cls in ADAPTER_CLASSES.items() if cls.supports_prefix_tokens)
            raise ValueError(
                f"keep_prefix_tokens=True needs an adapter that projects prefix tokens "
                f"{able}, not {adapter_type!r}: its queries read the patch grid as a whole."
            )

    def _check_strategy(self, strategy) -> None:
        if strategy not in VISION_FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}; LLaVA's strategies are 'default' (drop the [CLS]/prefix "
                "tokens) and 'full' (keep them)."
            )
        if strategy == "default" and self.prefix_tokens == 0:
            raise ValueError(
                f'vision_feature_select_strategy="default" drops the first token, but this tower '
                f'({self.vision_config.model_type}) has no [CLS]/prefix token: it would drop a patch. Use "full" '
                "(every token is a patch token)."
            )

    @property
    def vision_feature_select_strategy(self) -> str:
        """LLaVA's name for `keep_prefix_tokens`: "full" keeps the [CLS]/prefix tokens, "default" drops them."""
        return "full" if self.keep_prefix_tokens or self.prefix_tokens == 0 else "default"

    @vision_feature_select_strategy.setter
    def vision_feature_select_strategy(self, strategy: str) -> None:
        self._check_strategy(strategy)
        self.keep_prefix_tokens = strategy == "full"
        self._check_prefix_support()

    def _projector_field(self, name: str):
        return self.adapter_config.get(LLAVA_PROJECTOR_FIELDS[name])

    def _set_projector_field(self, name: str, value) -> None:
        adapter_type = self.adapter_config["adapter_type"]
        field = LLAVA_PROJECTOR_FIELDS[name]
        if adapter_type not in LLAVA_PROJECTOR_ADAPTERS[name]:
            raise ValueError(
                f"{name}={value!r} is LLaVA's projector {field}, but the {adapter_type!r} adapter has no such "
                f"setting: use adapter_config={{'adapter_type': 'mlp', ...}} (LLaVA's projector), or leave {name} out."
            )
        try:
            self.adapter_config = adapter_config_from_dict({**self.adapter_config, field: value}).to_dict()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}={value!r} (the adapter's {field}): {error}") from None

    projector_hidden_act = property(
        lambda self: self._projector_field("projector_hidden_act"),
        lambda self, value: self._set_projector_field("projector_hidden_act", value),
        doc="LLaVA's name for the mlp adapter's `hidden_act`.",
    )
    multimodal_projector_bias = property(
        lambda self: self._projector_field("multimodal_projector_bias"),
        lambda self, value: self._set_projector_field("multimodal_projector_bias", value),
        doc="LLaVA's name for the mlp/linear adapter's `bias`.",
    )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`, which sets `from_pretrained`'s overrides after the config is made: an override
        that names no field is refused instead of dropped."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        if return_unused_kwargs:  # a model's from_pretrained: the model refuses what its config did not take
            return config, unused
        unknown = unknown_kwargs(unused)
        if unknown:
            raise TypeError(unknown_fields_message(cls, unknown, LLAVA_NAMES))
        return config

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the tower's output."""
        if self.num_vision_prefix_tokens is not None:
            return self.num_vision_prefix_tokens
        return vision_prefix_tokens(self.vision_config)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The tower's patch grid at its configured image size."""
        if hasattr(self.vision_config, "grid_size"):
            return tuple(self.vision_config.grid_size)
        if self.vision_config.model_type in NAFLEX_VISION_MODEL_TYPES:  # a square table, resized to each image
            side = math.isqrt(self.vision_config.num_patches)
            return side, side
        size = self.vision_config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        patch_h, patch_w = vision_patch_size(self.vision_config)
        return height // patch_h, width // patch_w


__all__ = ["VisionLanguageConfig"]
