"""Configuration of the vision-language model: vision tower + projection adapter + causal language model."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .adapters import ADAPTER_CLASSES, adapter_config_from_dict

# Tokens before the patch tokens in the sequences of towers that don't say so in their config. Our own tower reports
# `num_prefix_tokens`; transformers' DINOv2 with registers reports `num_register_tokens` (plus its [CLS]).
PREFIX_TOKENS_BY_MODEL_TYPE = {"clip_vision_model": 1, "siglip_vision_model": 0, "vit": 1, "dinov2": 1}


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
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
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
        adapter_type = self.adapter_config["adapter_type"]
        if self.keep_prefix_tokens and not ADAPTER_CLASSES[adapter_type].supports_prefix_tokens:
            able = sorted(name for name, cls in ADAPTER_CLASSES.items() if cls.supports_prefix_tokens)
            raise ValueError(
                f"keep_prefix_tokens=True needs an adapter that projects prefix tokens {able}, not {adapter_type!r}: "
                "its queries read the patch grid as a whole."
            )
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the language model's vocabulary "
                f"(vocab_size={self.text_config.vocab_size}): resize the embeddings after adding <image>."
            )
        # tie the LM head like the text config says (transformers keeps the flag on the text config for most LMs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

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
        size = self.vision_config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        patch_h, patch_w = vision_patch_size(self.vision_config)
        return height // patch_h, width // patch_w


__all__ = ["VisionLanguageConfig"]
