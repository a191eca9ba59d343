"""The vision-language model: vision tower -> projection adapter -> `<image>` positions of a causal LM.

    pixel_values (I, C, H, W) --tower--> (I, T, D_v) --drop prefix--> (I, N, D_v) --adapter--> (I, N', D_lm)
    input_ids (B, S) --embed--> (B, S, D_lm), the N' placeholders of each image replaced in order (masked_scatter)
    --language model--> logits (B, S, V), loss on the supervised (answer/caption) tokens only

Images are flattened over the batch in the order their `<image>` placeholders appear (as LLaVA does), so a sample may
hold any number of images, and text-only samples can share a batch with image samples.

Three ways in for the images (the processor's `image_mode`; docs/vlm.md "Any resolution"):
- fixed: `pixel_values (I, C, H, W)` at the tower's size, `num_image_tokens` placeholders per image.
- native: `pixel_values (I, N, C*P*P)` patches, `pixel_attention_mask (I, N)`, `spatial_shapes (I, 2)`: the tower
  runs with the mask, padded patch tokens are dropped and each image is adapted on its own grid, so image i takes
  `adapter.num_output_tokens(*spatial_shapes[i])` placeholders (`image_token_counts`).
- tiles: `pixel_values (T, C, H, W)`, each split image's tiles row-major then its thumbnail, and `image_tiles (I, 2)`
  its (rows, columns) of tiles; every tile is a fixed-size image, laid out in the text with the separator tokens of
  `config.tile_separator_token_ids` (`tile_layout`), which the model checks.
"""

from __future__ import annotations

import inspect
import itertools
import logging

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..adapters import build_adapter
from ..encoder.configuration_vit import VisionTransformerConfig, unknown_fields_message
from ..encoder.modeling_vit import (
    VisionTransformerModel,
    allowing_missing_keys,
    check_weight_files,
    raise_on_mismatched_shapes,
    raise_on_missing_keys,
)
from .configuration_vlm import LLAVA_NAMES, NAFLEX_VISION_MODEL_TYPES, VisionLanguageConfig, vision_patch_size
from .packed_attention import SDPA_VARLEN, packed_sequences
from .processing_vlm import IGNORE_INDEX  # the label convention is the processor's (and transformers' loss default)

logger = logging.getLogger(__name__)

# packed rows (position_ids restarting at 0 per sequence, no attention_mask; see `vlm_vision.data.packing`): these
# build a block-diagonal causal mask from the position ids (transformers' `masking_utils`, without a cache) ...
PACKING_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
# ... and these attend within each sequence (varlen on cu_seqlens derived from them, for one flattened row; sdpa per
# sequence for sdpa_varlen, `packed_attention`), so a row's length costs nothing: the collator's `flatten`
PACKING_VARLEN_ATTENTION = (SDPA_VARLEN, "flash_attention_2", "flash_attention_3", "flash_attention_4")


def num_image_tokens_for(
    config: VisionLanguageConfig, adapter: nn.Module | None = None, grid: tuple[int, int] | None = None
) -> int:
    """Placeholder tokens per image: the adapter's `num_output_tokens` for the tower's grid (or `grid`, an image's
    own patch grid in native mode), plus the prefix tokens when they are kept. The processor and the model both
    count through here."""
    return image_token_count(
        config.adapter_config,
        config.prefix_tokens if config.keep_prefix_tokens else 0,
        grid or config.grid_size,
        adapter,
    )


def image_token_count(adapter_config: dict, kept_prefix_tokens: int, grid, adapter: nn.Module | None = None) -> int:
    """`adapter.num_output_tokens(*grid) + kept_prefix_tokens`; the adapter is built on the meta device if not given
    (what a processor does: it holds the adapter's config, not its weights)."""
    if adapter is None:
        with torch.device("meta"):  # only the count is needed, not the weights
            adapter = build_adapter(adapter_config)
    return adapter.num_output_tokens(*grid) + kept_prefix_tokens


def tile_layout(rows: int, columns: int, tile: list[int], column_separator: int, row_separator: int) -> list[int]:
    """The token ids of one split image: per row of tiles `tile (column_separator tile)* row_separator`, then the
    thumbnail's `tile`. A 1x1 split is the thumbnail alone (a single tile would repeat it)."""
    if rows * columns == 1:
        return list(tile)
    row = list(tile)
    for _ in range(columns - 1):
        row += [column_separator, *tile]
    return [*row, row_separator] * rows + list(tile)


class VisionLanguagePreTrainedModel(PreTrainedModel):
    config_class = VisionLanguageConfig
    config: VisionLanguageConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _init_weights(self, module: nn.Module) -> None:
        # the tower and the LM are PreTrainedModels that initialise themselves; the adapter has its own rule
        if module is getattr(self, "adapter", None):
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_missing_keys: bool = False, **kwargs):
        """transformers' `from_pretrained`, as strict as the encoder's (`VisionTransformerModel.from_pretrained`).

        - A weight the checkpoint lacks raises `CheckpointMismatchError` listing the missing keys (transformers
          initialises them afresh with a log line: a VLM with a random adapter or tower layer);
          `allow_missing_keys=True` accepts them, freshly initialised.
        - A weight of another shape raises `CheckpointMismatchError` listing every such key;
          `ignore_mismatched_sizes=True` re-initialises them instead.
        - A truncated or empty weight file raises `CheckpointFileError` naming it.
        """
        with allowing_missing_keys(allow_missing_keys):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        check_weight_files(checkpoint_files)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        raise_on_mismatched_shapes(model, load_config, loading_info)
        loading_info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        hint = "don't override fields such as adapter_config, vision_feature_layer or keep_prefix_tokens"
        raise_on_missing_keys(model, load_config, set(loading_info.missing_keys), hint)
        return loading_info

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, and the code files with `auto_map` (`vlm_vision.vlm.remote_code`), so the
        folder loads with `trust_remote_code=True` where vlm-vision isn't installed."""
        from .remote_code import add_model_auto_map, write_code_files

        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_code_files(save_directory)
            add_model_auto_map(save_directory)


class VisionLanguageForConditionalGeneration(VisionLanguagePreTrainedModel, GenerationMixin):
    """Vision tower + adapter + causal LM, for captioning and VQA (training and `generate`).

    Submodules: `vision_tower` (an `AutoModel`), `adapter` (`vlm_vision.adapters`), `language_model` (an
    `AutoModelForCausalLM`, with its own head).
    """

    def __init__(self, config: VisionLanguageConfig, *inputs, **kwargs):
        if inputs or kwargs:  # from_pretrained hands over the overrides its config did not take
            unknown = [*map(repr, inputs), *kwargs]
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {', '.join(unknown)}: it takes only its config. "
                + (unknown_fields_message(type(config), sorted(kwargs), LLAVA_NAMES) if kwargs else "")
            )
        super().__init__(config)
        # our tower by model type: loaded as remote code, the config's class is another file's copy, unknown to
        # AutoModel where the package (which registers it) isn't installed
        if config.vision_config.model_type == VisionTransformerConfig.model_type:
            self.vision_tower = VisionTransformerModel._from_config(config.vision_config)
        else:
            self.vision_tower = AutoModel.from_config(config.vision_config)
        self.adapter = build_adapter(config.adapter_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._no_split_modules = sorted(
            set(self.vision_tower._no_split_modules or []) | set(self.language_model._no_split_modules or [])
        )
        if config.tie_word_embeddings:
            self._tied_weights_keys = {
                f"language_model.{k}": f"language_model.{v}"
                for k, v in (self.language_model._tied_weights_keys or {}).items()
            }
        self.post_init()
        if isinstance(self.vision_tower, VisionTransformerModel):
            self.freeze_unused_vision_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image (see `num_image_tokens_for`)."""
        return num_image_tokens_for(self.config, self.adapter)

    @classmethod
    def from_parts(
        cls,
        vision_tower: PreTrainedModel,
        language_model: PreTrainedModel,
        *,
        image_token_id: int,
        adapter_config: dict | None = None,
        **config_kwargs,
    ) -> VisionLanguageForConditionalGeneration:
        """Assemble a VLM from a (pretrained) tower and causal LM, with a freshly initialised adapter.

        The parts are used as they are (no copy), attention implementations included; resize the LM's embeddings to
        the tokenizer first if `<image>` was added to it.
        """
        # building the composite model sets its default attention on the sub-configs, which are the parts' own
        attention = {"vision_config": vision_tower.config._attn_implementation}
        attention["text_config"] = language_model.config._attn_implementation
        config = cls.config_class(
            vision_config=vision_tower.config,
            text_config=language_model.config,
            adapter_config=adapter_config,
            image_token_id=image_token_id,
            **config_kwargs,
        )
        with torch.device("meta"):  # the random parts are replaced below: don't spend time initialising them
            model = cls(config)
        model.vision_tower = vision_tower
        model.language_model = language_model
        for part, name in ((vision_tower, "vision_config"), (language_model, "text_config")):
            if attention[name] is not None and part.config._attn_implementation != attention[name]:
                part.set_attn_implementation(attention[name])
        model.adapter = build_adapter(config.adapter_config).to(next(language_model.parameters()).dtype)
        model.freeze_unused_vision_parameters()
        return model

    def freeze_unused_vision_parameters(self) -> list[str]:
        """Freeze the tower parameters that never reach the image features, and return their names.

        VLMs read an intermediate layer, so the blocks after it, the final norm and any pooling head never get a
        gradient; left trainable, they would make DDP wait for gradients that never come. Our tower's are known from
        the config; for other towers, one blank image is run forward and backward to find them.
        """
        tower = self.vision_tower
        if isinstance(tower, VisionTransformerModel):
            deepest = max(i % (tower.config.num_hidden_layers + 1) for i in self.config.feature_layers)
            unused = [tower.layers[deepest:], tower.layernorm, tower.head, tower.pooler]
            names = {id(p) for module in unused if module is not None for p in module.parameters()}
        else:
            probe = self.blank_tower_inputs(self.dtype)
            saved = {n: (p.requires_grad, p.grad) for n, p in tower.named_parameters()}
            with torch.enable_grad():
                for parameter in tower.parameters():
                    parameter.requires_grad_(True)
                    parameter.grad = None
                self.vision_features(**probe).sum().backward()
            names = {id(p) for p in tower.parameters() if p.grad is None}
            for name, parameter in tower.named_parameters():  # leave trainability and gradients as they were
                parameter.requires_grad_(saved[name][0])
                parameter.grad = saved[name][1]
        frozen = [name for name, p in tower.named_parameters() if id(p) in names]
        for parameter in tower.parameters():
            if id(parameter) in names:
                parameter.requires_grad_(False)
        if frozen:
            logger.info("froze %d vision-tower tensors the feature layers never use", len(frozen))
        return frozen

    def vision_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        patch_image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The selected tower layers, concatenated on channels: (I, C, H, W) -> (I, T, D_v * len(layers)); or, in
        native mode, (I, N, C*P*P) patches with their mask and grids -> (I, T, ...) with padded rows left in; or,
        packed (`patch_image_ids`, our tower only), (R, L, C*P*P) rows -> (R, T, ...) in the tower's packed layout.

        Native inputs go to our tower, or to a transformers tower whose forward takes `pixel_attention_mask` and
        `spatial_shapes` (Siglip2); any other tower is refused (it would attend over the padding).

        A frozen tower (no parameter requiring grad, e.g. the `align` stage) runs without autograd: nothing upstream
        of the features could receive a gradient, so recording the graph would only cost memory and time.
        """
        frozen = not pixel_values.requires_grad and not any(p.requires_grad for p in self.vision_tower.parameters())
        native = {}
        if pixel_attention_mask is not None or spatial_shapes is not None or patch_image_ids is not None:
            native = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
            if not isinstance(self.vision_tower, VisionTransformerModel):
                if patch_image_ids is not None:
                    raise ValueError(
                        f"The vision tower ({type(self.vision_tower).__name__}) can't keep packed images apart "
                        "(patch_image_ids): only vlm-vision's VisionTransformerModel takes packed rows. Convert the "
                        "tower (convert=True), or use padded native rows (the image processor's pack_images=False)."
                    )
                self.check_tower_takes_native_inputs()
            elif patch_image_ids is not None:
                native["patch_image_ids"] = patch_image_ids
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            layers = self.config.feature_layers
            if isinstance(self.vision_tower, VisionTransformerModel):
                states = self.vision_tower.get_intermediate_layers(pixel_values, layers, **native)  # to the deepest
            else:
                outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True, **native)
                states = [outputs.hidden_states[i] for i in layers]
            return torch.cat(states, dim=-1)

    def blank_tower_inputs(self, dtype: torch.dtype) -> dict:
        """One blank image at the tower's own grid, in the form the tower takes: `pixel_values (1, C, H, W)`, or for
        a transformers NaFlex tower (Siglip2VisionModel, which takes patches only) `(1, N, C*P*P)` patches with
        their mask and `spatial_shapes` (the table's square grid)."""
        config = self.config.vision_config
        if config.model_type in NAFLEX_VISION_MODEL_TYPES:
            rows, columns = self.config.grid_size
            patch_h, patch_w = vision_patch_size(config)
            length = rows * columns
            return {
                "pixel_values": torch.zeros(
                    1, length, config.num_channels * patch_h * patch_w, device=self.device, dtype=dtype
                ),
                "pixel_attention_mask": torch.ones(1, length, dtype=torch.long, device=self.device),
                "spatial_shapes": torch.tensor([[rows, columns]], device=self.device),
            }
        height, width = _image_size(config)
        return {"pixel_values": torch.zeros(1, config.num_channels, height, width, device=self.device, dtype=dtype)}

    def check_tower_takes_native_inputs(self) -> None:
        """Refuse native-resolution inputs for a transformers tower whose forward has no patch mask and grids."""
        if not takes_native_inputs(self.vision_tower):
            raise ValueError(
                f"The vision tower ({type(self.vision_tower).__name__}) can't take pixel_attention_mask and "
                "spatial_shapes, so it would attend over the padded patches of native-resolution inputs: convert it "
                "into VisionTransformerModel (load_vision_tower(path), convert=True; vlm-vision-convert), use a "
                "Siglip2VisionModel, or use image_mode='fixed' / 'tiles' in the processor."
            )

    def image_token_counts(self, spatial_shapes) -> list[int]:
        """Placeholder tokens of each image in native mode, from its (rows, columns) patch grid."""
        return [num_image_tokens_for(self.config, self.adapter, (int(h), int(w))) for h, w in _grids(spatial_shapes)]

    def native_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None,
        spatial_shapes,
        patch_image_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Native mode: the tower on masked (or packed) patches, then each image's real patch tokens adapted on its
        own grid.

        Returns one `(image_token_counts[i], D_lm)` tensor per image (padded patch tokens dropped)."""
        dtype = next(self.vision_tower.parameters()).dtype
        features = self.vision_features(pixel_values.to(dtype), pixel_attention_mask, spatial_shapes, patch_image_ids)
        grids = _grids(spatial_shapes)
        if patch_image_ids is not None:  # packed rows: each image's prefix tokens and patches
            images = self.vision_tower.unpack_image_tokens(features, patch_image_ids, spatial_shapes)
            return [self.project_vision_features(x[None], grid)[0] for x, grid in zip(images, grids, strict=True)]
        prefix = self.config.prefix_tokens
        return [
            self.project_vision_features(features[i : i + 1, : prefix + h * w], (h, w))[0]
            for i, (h, w) in enumerate(grids)
        ]

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens in the LM's embedding space: (I, C, H, W) -> (I, num_image_tokens, D_lm)."""
        dtype = next(self.vision_tower.parameters()).dtype
        features = self.vision_features(pixel_values.to(dtype))
        patch_h, patch_w = vision_patch_size(self.config.vision_config)
        return self.project_vision_features(
            features, (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
        )

    def project_vision_features(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tower features to image tokens: (I, T, D_v * len(layers)) on a `grid` of patches -> (I, N', D_lm)."""
        prefix = self.config.prefix_tokens
        features = features.to(_dtype_of(self.adapter, features))
        projected = self.adapter(features[:, prefix:], grid)
        if self.config.keep_prefix_tokens and prefix:
            projected = torch.cat([self.adapter.forward_prefix_tokens(features[:, :prefix]), projected], dim=1)
        return projected

    def check_image_index(self, image_index: torch.Tensor, num_images: int) -> None:
        """Validate `image_index` (one image number per `<image>` span) against `num_images` images; the number of
        spans is checked with the placeholders (:meth:`check_image_placeholders`)."""
        if (
            not isinstance(image_index, torch.Tensor)
            or image_index.dim() != 1
            or image_index.dtype
            not in (
                torch.int32,
                torch.int64,
            )
        ):
            raise ValueError(
                f"image_index must be a 1-D integer tensor (one image number per <image> span, in placeholder order), "
                f"got {_describe(image_index)}."
            )
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= num_images):
            raise ValueError(
                f"image_index holds {int(image_index.min())}..{int(image_index.max())} but there are {num_images} "
                f"images: its values index pixel_values (or vision_features) along the first axis."
            )

    def check_image_placeholders(
        self,
        input_ids: torch.Tensor,
        num_images: int,
        tokens_per_image: int,
        image_index: torch.Tensor | None = None,
    ) -> None:
        """Refuse a batch whose `<image>` placeholders don't match its images (or its `image_index`, one entry per
        span), naming the sample and both counts."""
        per_sample = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        for index, count in enumerate(per_sample):
            if count % tokens_per_image:
                raise ValueError(
                    f"Sample {index} has {count} <image> placeholder tokens, which is not a multiple of the "
                    f"{tokens_per_image} tokens each image takes: its image span was cut (truncation?) or built for "
                    "another adapter. Build inputs with the VisionLanguageProcessor saved with this model."
                )
        spans = sum(per_sample) // tokens_per_image
        if image_index is not None:
            if spans != image_index.numel():
                raise ValueError(
                    f"The batch has {spans} <image> spans but image_index has {image_index.numel()} entries: give "
                    "one entry per span, in placeholder order."
                )
        elif spans != num_images:
            counts = ", ".join(f"sample {i}: {c // tokens_per_image}" for i, c in enumerate(per_sample))
            raise ValueError(
                f"The batch has placeholders for {spans} images ({counts}) but "
                f"pixel_values holds {num_images} images ({num_images * tokens_per_image} image features). Pass one "
                "image per <image> tag, in order."
            )

    def check_native_placeholders(
        self, input_ids: torch.Tensor, counts: list[int], image_index: torch.Tensor | None = None
    ) -> None:
        """Native mode: every run of `<image>` placeholders must be exactly the next images' token counts (image i
        takes `counts[i]`, from its own grid; with `image_index`, span k shows image `image_index[k]`)."""
        span_counts = counts if image_index is None else [counts[i] for i in image_index.tolist()]
        is_image = (input_ids == self.config.image_token_id).tolist()
        taken = 0
        for sample, row in enumerate(is_image):
            for _, run in itertools.groupby(row):
                run = list(run)
                if not run[0]:
                    continue
                length, first = len(run), taken
                covered = 0
                while covered < length and taken < len(span_counts):
                    covered += span_counts[taken]
                    taken += 1
                if covered != length:
                    raise ValueError(
                        f"Sample {sample} has a run of {length} <image> placeholder tokens, but the images it "
                        f"should hold (numbers {first}..{taken - 1} in placeholder order) take "
                        f"{span_counts[first:taken]} tokens each, from their patch grids (spatial_shapes): the span "
                        "was cut (truncation?) or built for other images, grids or another adapter. Build inputs "
                        "with the VisionLanguageProcessor saved with this model (image_mode='native')."
                    )
        if taken != len(span_counts):
            what = "image_index has" if image_index is not None else "pixel_values holds"
            raise ValueError(
                f"The batch has placeholders for {taken} images but {what} {len(span_counts)}: pass one image per "
                "<image> tag, in order."
            )

    def check_tile_layout(
        self,
        input_ids: torch.Tensor,
        image_tiles: torch.Tensor,
        num_tiles: int,
        image_index: torch.Tensor | None = None,
    ) -> None:
        """Tiles mode: the tile images add up to `image_tiles`, and the batch's `<image>` and separator tokens, read
        in order, are exactly each split image's `tile_layout`."""
        separators = self.config.tile_separator_token_ids
        if separators is None:
            raise ValueError(
                "image_tiles (image splitting) was given but config.tile_separator_token_ids is None, so the tile "
                "layout can't be checked: set it to processor.tile_separator_token_ids (the recipe does)."
            )
        if image_index is not None:
            raise ValueError("image_index is not supported with image_tiles: give each sample its own tiled images.")
        grids = _grids(image_tiles)
        per_image = [h * w + 1 if h * w > 1 else 1 for h, w in grids]
        if sum(per_image) != num_tiles:
            raise ValueError(
                f"image_tiles {[list(g) for g in grids]} asks for {sum(per_image)} tile images (rows x columns + 1 "
                f"thumbnail per split image) but pixel_values holds {num_tiles}: pass pixel_values and image_tiles "
                "from the same processor call."
            )
        tile = [self.config.image_token_id] * self.num_image_tokens
        expected = [tile_layout(h, w, tile, *separators) for h, w in grids]
        kept = torch.tensor([self.config.image_token_id, *separators], device=input_ids.device)
        found = input_ids[torch.isin(input_ids, kept)].tolist()  # row-major over the batch: placeholder order
        flat = [token for layout in expected for token in layout]
        if found != flat:
            starts = [0, *itertools.accumulate(len(layout) for layout in expected)]
            wrong = (i for i, layout in enumerate(expected) if found[starts[i] : starts[i + 1]] != layout)
            number = next(wrong, len(expected) - 1)
            raise ValueError(
                f"The <image> and tile separator tokens of the batch don't match the layout of split image {number} "
                f"({grids[number][0]}x{grids[number][1]} tiles of {self.num_image_tokens} tokens, each row ended by "
                "the row separator, tiles of a row joined by the column separator, then the thumbnail): "
                f"{len(found)} such tokens found, {len(flat)} expected. Build inputs with the VisionLanguageProcessor "
                "saved with this model (image_mode='tiles')."
            )

    def check_vision_features(self, vision_features: torch.Tensor) -> None:
        """Refuse precomputed tower features whose shape is not `vision_features(pixel_values)`'s at the tower's
        configured image size: (num_images, T, D_v * len(feature_layers))."""
        if not isinstance(vision_features, torch.Tensor) or not vision_features.is_floating_point():
            raise TypeError(
                "vision_features must be a float torch.Tensor (the output of model.vision_features), got "
                f"{_describe(vision_features)}: read "
                "them from a feature store (vlm_vision.vlm.feature_cache), or pass pixel_values."
            )
        grid_h, grid_w = self.config.grid_size
        expected = (self.config.prefix_tokens + grid_h * grid_w, self.config.adapter_config["vision_hidden_size"])
        if vision_features.dim() != 3 or tuple(vision_features.shape[1:]) != expected:
            raise ValueError(
                f"vision_features must be (num_images, {expected[0]}, {expected[1]}) (the output of "
                f"model.vision_features at the tower's {grid_h}x{grid_w} grid), got {tuple(vision_features.shape)}: "
                "cache features with the same tower, feature layers and image size, or pass pixel_values."
            )

    def embed_inputs(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        vision_features: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        image_tiles: torch.Tensor | None = None,
        patch_image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LM's input embeddings with every image's features scattered into its placeholder positions.

        `vision_features` (precomputed `vision_features(pixel_values)`, e.g. from `vlm_vision.vlm.feature_cache`)
        replaces `pixel_values`: the tower does not run. `image_index` (see `forward`) maps placeholder spans to images.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            check_input_ids(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        images = pixel_values if vision_features is None else vision_features
        if images is not None:
            if pixel_values is not None and vision_features is not None:
                raise ValueError("Pass pixel_values or precomputed vision_features, not both.")
            if input_ids is None:
                raise ValueError("Images need input_ids, to find the <image> placeholder positions.")
            native = spatial_shapes is not None or pixel_attention_mask is not None or patch_image_ids is not None
            if native and (vision_features is not None or image_tiles is not None):
                raise ValueError(
                    "pixel_attention_mask/spatial_shapes (native resolution) go with patchified pixel_values only, "
                    "not with vision_features or image_tiles: pick one image_mode in the processor."
                )
            if vision_features is not None:
                self.check_vision_features(vision_features)
            elif native:
                check_native_pixel_values(pixel_values, spatial_shapes)
            else:
                check_pixel_values(pixel_values)
            if image_index is not None:  # packed rows hold several images each
                num_images = images.shape[0] if patch_image_ids is None else len(_grids(spatial_shapes))
                self.check_image_index(image_index, num_images)
            if native:
                counts = self.image_token_counts(spatial_shapes)
                self.check_native_placeholders(input_ids, counts, image_index)
                image_features = torch.cat(
                    self.native_image_features(pixel_values, pixel_attention_mask, spatial_shapes, patch_image_ids)
                )
                if image_index is not None:  # each span's rows, in placeholder order
                    starts = [0, *itertools.accumulate(counts)]
                    rows = [torch.arange(starts[i], starts[i + 1]) for i in image_index.tolist()]
                    image_features = image_features[torch.cat(rows).to(image_features.device)]
            else:
                if image_tiles is not None:
                    self.check_tile_layout(input_ids, image_tiles, images.shape[0], image_index)
                else:
                    self.check_image_placeholders(input_ids, images.shape[0], self.num_image_tokens, image_index)
                image_features = None
                if images.shape[0]:
                    if vision_features is None:
                        image_features = self.get_image_features(pixel_values)
                    else:
                        image_features = self.project_vision_features(vision_features, self.config.grid_size)
                    if image_index is not None:
                        image_features = image_features[image_index.to(image_features.device)]
                    image_features = image_features.flatten(0, 1)
            if image_features is not None and image_features.shape[0]:
                mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
                inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))
        elif self.training and torch.is_grad_enabled():
            # A batch without images still runs the tower (on one blank image, contributing zero): under DDP every
            # rank must produce gradients for the same parameters, or the all-reduce waits forever.
            blank = self.blank_tower_inputs(inputs_embeds.dtype)
            if "spatial_shapes" in blank:
                features = torch.cat(self.native_image_features(**blank))
            else:
                features = self.get_image_features(blank["pixel_values"])
            inputs_embeds = inputs_embeds + 0.0 * features.sum()
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_index: torch.LongTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        image_tiles: torch.Tensor | None = None,
        patch_image_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: `(B, S)` with `num_image_tokens` `<image>` placeholders per image (the processor inserts them).
            pixel_values: `(I, C, H, W)`, the images of all samples in placeholder order; None for text only.
            attention_mask: `(B, S)`.
            labels: `(B, S)`, -100 where no loss is taken (prompt, image tokens, padding); shifted inside the LM.
            vision_features: `(I, T, D_v * len(feature_layers))`, precomputed `vision_features(pixel_values)` of a
                frozen tower (a feature cache), instead of `pixel_values`.
            image_index: `(N,)`, for each `<image>` span in placeholder order, the image it shows (an index into
                `pixel_values` or `vision_features`). Sequences that ask about the same image then share one encoding:
                the tower runs once per image, and gradients from every sequence reach it. None: span i is image i.
            pixel_attention_mask: native mode, `(I, N)` 1 for a patch of `pixel_values (I, N, C*P*P)`, 0 for padding.
            spatial_shapes: native mode, `(I, 2)` each image's (rows, columns) of patches; image i then takes
                `image_token_counts(spatial_shapes)[i]` placeholders.
            image_tiles: tiles mode, `(I, 2)` each split image's (rows, columns) of tiles; `pixel_values` then holds
                the tiles and thumbnails, and the text the `tile_layout` of each.
            patch_image_ids: native mode with the tower's images packed (the image processor's `pack_images=True`):
                `pixel_values (R, L, C*P*P)` rows of several images each, `patch_image_ids (R, L)` the image of each
                patch slot (-1 padding), `spatial_shapes (I, 2)`. Our tower only; the loss equals the padded form's.
            kwargs: passed to the language model (`cache`/`past_key_values`, `use_cache`, `position_ids`, ...).
                `position_ids` restarting at 0 inside a row, without `attention_mask`, are packed rows (several
                conversations per row, `vlm_vision.data.packing`): attention stays within each conversation (the
                cache is turned off for that; implementations that can't are refused) and the first label of each
                conversation is ignored, so the loss and logits are those of the conversations run alone.
        """
        # placeholders without images are an error, except when continuing a sequence whose images are cached
        # (generate's first step passes an empty cache: that is no continuation)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        continuing = cache is not None and (cache.get_seq_length() if hasattr(cache, "get_seq_length") else 1) > 0
        no_images = pixel_values is None and vision_features is None and input_ids is not None and not continuing
        if no_images and (input_ids == self.config.image_token_id).any():
            raise ValueError("input_ids contain <image> placeholders but no pixel_values were given: pass the images.")
        position_ids = kwargs.get("position_ids")
        packed = packed_rows(position_ids, attention_mask)
        if packed:
            self.check_packing(position_ids, attention_mask, kwargs)
            kwargs["use_cache"] = False  # with a cache, masking_utils would not build the block-diagonal mask
        if pixel_values is None:  # generate forwards spatial_shapes / image_tiles after the prefill, without pixels
            spatial_shapes = image_tiles = patch_image_ids = None
        inputs_embeds = self.embed_inputs(
            input_ids,
            pixel_values,
            inputs_embeds,
            vision_features,
            image_index,
            pixel_attention_mask,
            spatial_shapes,
            image_tiles,
            patch_image_ids,
        )
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
            if packed:  # a sequence's first token is never predicted (alone, nothing comes before it)
                labels = labels.masked_fill(position_ids.to(labels.device) == 0, IGNORE_INDEX)
            if not (labels[:, 1:] != IGNORE_INDEX).any():
                logger.warning(
                    "This batch has no supervised token (all labels are -100): its loss is undefined. Check the "
                    "label masking (answers truncated away?)."
                )
        if packed and self.language_model.config._attn_implementation in PACKING_VARLEN_ATTENTION:
            # flash-attention reads packed sequences from position_ids in one row only; sdpa_varlen builds no mask
            rows, width = inputs_embeds.shape[:2]
            flat = flatten_packed_rows(inputs_embeds, position_ids, labels)
            with packed_sequences(flat["position_ids"]):
                outputs = self.language_model(**{**kwargs, **flat})
            outputs.logits = outputs.logits.reshape(rows, width, -1)
            return outputs
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def check_packing(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> None:
        """Refuse packed rows that the language model would attend across: an attention mask or a cache beside
        them (transformers then ignores the packing), position ids that don't restart at 0 per sequence, or an
        attention implementation that doesn't read packed sequences from the position ids."""
        if attention_mask is not None:
            raise ValueError(
                "position_ids restart inside a row (packed sequences) but an attention_mask was given: transformers "
                "then builds an ordinary causal mask and the sequences attend to each other. Pass attention_mask=None "
                "with packed rows (VLMCollator(pack_length=...) does)."
            )
        if kwargs.get("use_cache") or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError(
                "Packed rows (position_ids restarting inside a row) can't use a cache: masking_utils only builds "
                "the per-sequence mask without one. Pass use_cache=False and no cache (training does)."
            )
        steps = position_ids[:, 1:] - position_ids[:, :-1]
        if (position_ids[:, 0] != 0).any() or not ((steps == 1) | (position_ids[:, 1:] == 0)).all():
            raise ValueError(
                "Packed rows need position_ids that count 0, 1, 2, ... within each sequence and restart at 0 where the "
                f"next one starts; got {position_ids.tolist()[:2]}... Build them with vlm_vision.data.packing."
            )
        check_packing_attention(self.language_model.config._attn_implementation)


def check_packing_attention(implementation: str | None) -> None:
    """Refuse an attention implementation that doesn't keep packed sequences apart, naming those that do."""
    supported = PACKING_MASK_ATTENTION + PACKING_VARLEN_ATTENTION
    if implementation not in supported:
        raise ValueError(
            f"The language model's attention implementation {implementation!r} can't keep packed sequences apart "
            f"(they would attend to each other). Use one of {list(supported)} (language_model.attn_implementation "
            "in a recipe), or turn packing off."
        )


def flatten_packed_rows(inputs_embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """Packed rows (R, L) as one row (1, R * L): `inputs_embeds`, `position_ids` and `labels` for the LM. Every row
    starts a sequence, whose first label is ignored (-100), so no loss term crosses from one row into the next."""
    rows, width = position_ids.shape
    flat = {"inputs_embeds": inputs_embeds.reshape(1, rows * width, -1), "position_ids": position_ids.reshape(1, -1)}
    flat["labels"] = None if labels is None else labels.reshape(1, rows * width)
    return flat


def packed_rows(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bool:
    """Whether `position_ids` (B, S) hold several sequences per row: a step other than +1 between two real tokens
    (what transformers' `find_packed_sequence_indices` reads as a new sequence). Left-padded generation steps too,
    after padding, where the attention mask is 0: that is no packing."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return False
    restarts = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if attention_mask is not None and attention_mask.dim() == 2:
        restarts &= attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return bool(restarts.any())


PROCESSOR_HINT = (
    "build the inputs with the VisionLanguageProcessor saved with the model (AutoProcessor.from_pretrained(folder)"
    '(images=..., text=..., return_tensors="pt"))'
)


def takes_native_inputs(tower) -> bool:
    """Our tower, or a transformers tower whose forward takes the patch mask and grids (Siglip2VisionModel)."""
    if isinstance(tower, VisionTransformerModel):
        return True
    return {"pixel_attention_mask", "spatial_shapes"} <= set(inspect.signature(tower.forward).parameters)


def _kind(value) -> str:
    return f"{type(value).__module__.split('.')[0]}.{type(value).__name__}"


def _describe(value) -> str:
    """What an input check was given: a tensor's dtype and shape, or any other value's type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return _kind(value)


def check_pixel_values(pixel_values) -> None:
    """Refuse pixel values the tower can't take: not a tensor (numpy, lists), not float (raw uint8 pixels), not
    (num_images, channels, height, width)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a float torch.Tensor (num_images, channels, height, width), got "
            f"{_kind(pixel_values)}: {PROCESSOR_HINT}, or torch.from_numpy(array) for normalised float pixels."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}, but the model takes normalised float pixel values (raw "
            f"0-255 pixels would be read as huge values): {PROCESSOR_HINT}, which rescales and normalises them."
        )
    if pixel_values.dim() != 4:
        single = " (one image: pixel_values[None])" if pixel_values.dim() == 3 else ""
        raise ValueError(
            f"pixel_values must be (num_images, channels, height, width), got {tuple(pixel_values.shape)}{single}: "
            "images of all samples are concatenated along the first axis."
        )


def check_native_pixel_values(pixel_values, spatial_shapes) -> None:
    """Refuse native-resolution inputs that are not (num_images, patches, channels * patch * patch) float patches
    with their grids (the tower checks the grids and the mask against them)."""
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point() or pixel_values.dim() != 3:
        raise ValueError(
            f"With pixel_attention_mask/spatial_shapes (native resolution), pixel_values must be float patches "
            f"(num_images, patches, channels * patch * patch), got {_describe(pixel_values)}: use the processor's "
            "image_mode='native' (an image processor with max_num_patches), or drop the mask and spatial_shapes for "
            "(I, C, H, W) images."
        )
    if spatial_shapes is None:
        raise ValueError(
            "pixel_attention_mask or patch_image_ids was given without spatial_shapes: the model needs each image's "
            "(rows, columns) patch grid. Pass the processor's spatial_shapes with it."
        )


def _grids(shapes) -> list[tuple[int, int]]:
    """(I, 2) integer rows/columns (a tensor or nested list) as Python pairs."""
    shapes = torch.as_tensor(shapes)
    if shapes.dim() != 2 or shapes.shape[1] != 2 or shapes.is_floating_point() or shapes.dtype == torch.bool:
        raise ValueError(
            f"A grid tensor (spatial_shapes, image_tiles) must be integers of shape (num_images, 2), one (rows, "
            f"columns) per image, got {tuple(shapes.shape)} {shapes.dtype}: pass the processor's."
        )
    return [(int(h), int(w)) for h, w in shapes.tolist()]


def check_input_ids(input_ids) -> None:
    """Refuse token ids that are not an integer (batch, sequence) tensor."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(
            f"input_ids must be an integer torch.Tensor (batch, sequence), got {_describe(input_ids)}: "
            f"{PROCESSOR_HINT}."
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}: add a batch dimension with "
            "input_ids[None] for one sequence."
        )


def _image_size(vision_config) -> tuple[int, int]:
    size = vision_config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _dtype_of(module: nn.Module, fallback: torch.Tensor) -> torch.dtype:
    parameter = next(module.parameters(), None)
    return parameter.dtype if parameter is not None else fallback.dtype


__all__ = [
    "VisionLanguageForConditionalGeneration",
    "VisionLanguagePreTrainedModel",
    "check_packing_attention",
    "flatten_packed_rows",
    "image_token_count",
    "packed_rows",
    "tile_layout",
]
