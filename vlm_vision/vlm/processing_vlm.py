"""The processor of the vision-language model: image processor + tokenizer, `<image>` expansion and label masking.

Each `<image>` tag in a text becomes exactly `num_image_tokens` placeholder tokens (the adapter's
`num_output_tokens` for the tower's grid, computed once when the processor is built from a model config and saved
with it). Conversations are rendered with a chat template (the tokenizer's own, or one of `CHAT_TEMPLATES`) and only
the assistant turns carry labels, so changing the language model doesn't break the masking.

Images go through the tower's own image processor (`image_processor`, e.g. CLIP's shortest-edge resize + centre
crop); with `image_aspect_ratio="pad"` each image is first padded to a square with the processor's mean colour, as
LLaVA-1.5 does.

`image_mode` picks how an image becomes tokens (docs/vlm.md "Any resolution"):
- "fixed" (default): every image at the tower's size, `num_image_tokens` placeholders each.
- "native": the image processor's native-resolution mode (`max_num_patches`): each image keeps its aspect ratio on
  its own patch grid, and its `<image>` span gets `adapter.num_output_tokens(grid)` (+ kept prefix tokens)
  placeholders. Returns pixel_values (I, N, C*P*P), pixel_attention_mask (I, N), spatial_shapes (I, 2).
- "tiles": image splitting (an Idefics3-like longest-edge rule, `split_image`): the long side gets
  min(max_tiles, ceil(long / tile)) tiles of the tower's size, the short side as many as keep the aspect ratio
  (rounded up), the image is resized to that grid and cut; a thumbnail of the whole image follows. Each tile takes
  `num_image_tokens`; the text holds `tile_layout` (column separator between the tiles of a row, row separator after
  each row). Returns pixel_values (T, C, H, W) and image_tiles (I, 2).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
IMAGE_ASPECT_RATIOS = ("squash", "pad")
IMAGE_MODES = ("fixed", "native", "tiles")
TILE_SEPARATOR_TOKENS = ("<tile_col>", "<tile_row>")

# Used for tokenizers without a chat template (e.g. a sentencepiece model trained on the data). The assistant turn
# ends with the EOS token, so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# LLaVA's "plain" conversation (its stage-1 alignment on captions): the user turn's images and nothing else (no
# question, no system prompt, no role markup), then the caption, ended by EOS so the model learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<image>' * message['content'].count('<image>') }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
# A saved tokenizer writes at least one of these (fast: tokenizer.json; sentencepiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# The JSON files a processor folder may hold (transformers reads them; a truncated one is named here)
PROCESSOR_JSON_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
)
# Chat templates by name (`--chat-template NAME`); "model" is the tokenizer's own.
CHAT_TEMPLATES = {"plain": PLAIN_CHAT_TEMPLATE, "user_assistant": DEFAULT_CHAT_TEMPLATE}

Message = dict[str, str]


class ChatTemplateError(ValueError):
    """A chat template that cannot be used: missing, unknown, or rendering that can't be split into prompt/answer."""


class ConversationTooLongError(ValueError):
    """A conversation longer than `max_length` tokens (never truncated: that could cut an image span)."""


def resolve_chat_template(spec: str | None, tokenizer, where: str = "the language model") -> str:
    """The Jinja text of a chat template named by `spec`.

    Args:
        spec: None or "model" (the tokenizer's own), a name in `CHAT_TEMPLATES` ("plain", "user_assistant"), the
            path of a Jinja file, or the Jinja text itself.
        tokenizer: the tokenizer whose own template "model" means.
        where: names the tokenizer in errors (e.g. its folder).
    """
    if spec is None or spec == "model":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not template:
            raise ChatTemplateError(
                f"The tokenizer of {where} has no chat template. Pass one: --chat-template NAME (one of "
                f"{sorted(CHAT_TEMPLATES)}; 'user_assistant' renders 'USER: ... ASSISTANT: ...'), the path of a Jinja "
                "file, or the Jinja text (in a recipe: language_model.chat_template)."
            )
        return template
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as file:
            return file.read()
    raise ChatTemplateError(
        f"chat_template={spec!r} is neither a template name ('model', {', '.join(map(repr, sorted(CHAT_TEMPLATES)))}), "
        "a Jinja file that exists, nor Jinja text: fix the name or the path."
    )


def normalize_messages(messages: Sequence, image_token: str = IMAGE_TOKEN) -> list[Message]:
    """Chat messages as `[{"role", "content": str}]`, checked.

    Accepts transformers' content-list form (`{"role": "user", "content": [{"type": "image"}, {"type": "text",
    "text": "..."}]}`): image parts become `image_token` tags (a text after an image starts on a new line, as
    LLaVA writes `<image>\nquestion`). Refuses unknown roles (a misspelt "asistant" would silently supervise
    nothing) and contents that are not text.
    """
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise TypeError(
            f"A conversation is a list of messages ({{'role': ..., 'content': ...}}), got {type(messages).__name__}."
        )
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"Message {index} must be a dict with 'role' and 'content', got {message!r}.")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"Message {index} has role {role!r}{hint}; a role is one of {list(ROLES)}.")
        if isinstance(content, list):
            content = _join_content_parts(content, index, image_token)
        elif not isinstance(content, str):
            raise ValueError(
                f"Message {index} ({role}) has content {content!r} of type {type(content).__name__}: give the text as "
                "a string (or a list of {'type': 'text', 'text': ...} / {'type': 'image'} parts)."
            )
        normalized.append({"role": role, "content": content})
    return normalized


def _join_content_parts(parts: list, index: int, image_token: str) -> str:
    text = ""
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text += image_token
        elif kind == "text" and isinstance(part.get("text"), str):
            text += ("\n" if text.endswith(image_token) else "") + part["text"]
        else:
            raise ValueError(
                f"Message {index} has a content part {part!r}: parts are {{'type': 'image'}} or "
                "{'type': 'text', 'text': str}."
            )
    return text


# where transformers' processors find an image part's image (`ProcessorMixin._multimodal_inputs_from_conversations`)
IMAGE_PART_KEYS = ("image", "path", "url")


def _inline_images(messages) -> list:
    """The images given inside a conversation's image parts, in order."""
    return [
        part[key]
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
        for key in IMAGE_PART_KEYS
        if part.get(key) is not None  # Arrow rows give every part every key, None where unused
    ]


def pad_to_square(image: Image.Image, background: Sequence[float]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: the image centred on a square canvas of `background` (RGB in [0, 1], truncated
    to 8 bits as LLaVA does: `int(255 * mean)`)."""
    width, height = image.size
    if width == height:
        return image
    fill = tuple(int(255 * c) for c in background)
    canvas = Image.new(image.mode, (max(width, height),) * 2, fill if image.mode == "RGB" else fill[0])
    canvas.paste(image, ((max(width, height) - width) // 2, (max(width, height) - height) // 2))
    return canvas


class VisionLanguageProcessor(ProcessorMixin):
    """Image processor + tokenizer for [`VisionLanguageForConditionalGeneration`].

    Args:
        image_processor: the tower's own image processor (e.g. `CLIPImageProcessorPil`, `ViTImageProcessorPil`).
        tokenizer: the language model's tokenizer; `<image>` is added to it as a special token if missing (then
            resize the model's embeddings to `len(tokenizer)`).
        num_image_tokens: placeholder tokens per image; use `from_model_config` to take it from the model.
        image_token: the placeholder text.
        image_aspect_ratio: "squash" (the image processor as it is) or "pad" (LLaVA-1.5: pad to a square with the
            image processor's mean colour first, so nothing is cropped away or distorted).
        image_mode: "fixed", "native" or "tiles" (module docstring).
        adapter_config: the model's adapter config (native mode counts each image's tokens with it);
            `from_model_config` fills it in.
        kept_prefix_tokens: prefix tokens the model keeps per image (native mode adds them to each count).
        max_tiles: tiles mode, the most tiles along an image's long side.
        chat_template: overrides the tokenizer's template (Jinja text).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        image_token=IMAGE_TOKEN,
        image_aspect_ratio="squash",
        image_mode="fixed",
        adapter_config=None,
        kept_prefix_tokens=0,
        max_tiles=None,
        **kwargs,
    ):
        if num_image_tokens is None or not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
            raise ValueError(
                f"num_image_tokens must be a positive int, got {num_image_tokens!r}: build the processor with "
                "VisionLanguageProcessor.from_model_config(config, image_processor, tokenizer)."
            )
        if tokenizer is None or image_processor is None:
            missing = " and ".join(
                n for n, v in (("tokenizer", tokenizer), ("image_processor", image_processor)) if v is None
            )
            raise ValueError(
                f"VisionLanguageProcessor needs a {missing}: pass the language model's tokenizer and the tower's "
                "image processor (AutoTokenizer / AutoImageProcessor .from_pretrained(folder))."
            )
        for name, part, loader in (
            ("tokenizer", tokenizer, "AutoTokenizer"),
            ("image_processor", image_processor, "AutoImageProcessor"),
        ):
            if isinstance(part, (str, os.PathLike)):
                raise TypeError(
                    f"{name}={str(part)!r} is a path, not a {name}: load it first ({loader}.from_pretrained(path)), "
                    "or load the whole processor with VisionLanguageProcessor.from_pretrained(folder)."
                )
        if not callable(getattr(tokenizer, "get_vocab", None)):
            raise TypeError(
                f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}: pass "
                "AutoTokenizer.from_pretrained(language_model_folder)."
            )
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}; choose one of {IMAGE_ASPECT_RATIOS}.")
        self._check_image_mode(image_mode, image_processor, adapter_config, max_tiles, image_aspect_ratio)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.image_aspect_ratio = image_aspect_ratio
        self.image_mode = image_mode
        self.adapter_config = adapter_config
        self.kept_prefix_tokens = int(kept_prefix_tokens)
        self.max_tiles = max_tiles
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        separators = [t for t in TILE_SEPARATOR_TOKENS if image_mode == "tiles" and t not in tokenizer.get_vocab()]
        if separators:  # then resize the model's embeddings, and set config.tile_separator_token_ids
            tokenizer.add_special_tokens({"additional_special_tokens": separators}, replace_extra_special_tokens=False)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None and tokenizer.unk_token is None:
                raise ValueError(
                    f"The tokenizer ({type(tokenizer).__name__}) has no pad, eos or unk token, so batches cannot be "
                    "padded: set one first (tokenizer.pad_token = ..., or tokenizer.add_special_tokens({'pad_token': "
                    "'<pad>'}) and resize the model's embeddings)."
                )
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        chat_template = kwargs.pop("chat_template", None) or tokenizer.chat_template
        if not chat_template:
            logger.info(
                "the tokenizer has no chat template: using the plain USER/ASSISTANT one (DEFAULT_CHAT_TEMPLATE)"
            )
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self._layouts: dict = {}

    @staticmethod
    def _check_image_mode(image_mode, image_processor, adapter_config, max_tiles, image_aspect_ratio) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode={image_mode!r}; choose one of {IMAGE_MODES}.")
        if image_mode == "native":
            if getattr(image_processor, "max_num_patches", None) is None:
                raise ValueError(
                    f"image_mode='native' needs an image processor with a patch budget (max_num_patches), got "
                    f"{type(image_processor).__name__} without one: use VisionTransformerImageProcessor("
                    "patch_size=..., max_num_patches=...) (or Siglip2ImageProcessor), or image_mode='fixed'."
                )
            if not isinstance(adapter_config, dict):
                raise ValueError(
                    "image_mode='native' counts each image's tokens with the model's adapter: build the processor "
                    "with VisionLanguageProcessor.from_model_config(config, image_processor, tokenizer, "
                    "image_mode='native')."
                )
            if image_aspect_ratio != "squash":
                raise ValueError(
                    "image_mode='native' keeps each image's aspect ratio: use image_aspect_ratio='squash'."
                )
        if image_mode == "tiles" and (not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1):
            raise ValueError(
                f"image_mode='tiles' needs max_tiles, the most tiles along an image's long side, as an int >= 1 "
                f"(e.g. 3), got {max_tiles!r}."
            )

    @property
    def tile_separator_token_ids(self) -> list[int] | None:
        """`[column_separator_id, row_separator_id]` in tiles mode (the model's `config.tile_separator_token_ids`)."""
        if self.image_mode != "tiles":
            return None
        return self.tokenizer.convert_tokens_to_ids(list(TILE_SEPARATOR_TOKENS))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, and the code files with `auto_map` (`vlm_vision.vlm.remote_code`), so the
        folder loads through `AutoProcessor` with `trust_remote_code=True` where vlm-vision isn't installed."""
        from .remote_code import add_processor_auto_map, write_code_files

        saved = super().save_pretrained(save_directory, *args, **kwargs)
        ours = type(self.image_processor).__name__ == "VisionTransformerImageProcessor"
        write_code_files(save_directory)
        add_processor_auto_map(save_directory, image_processor_is_ours=ours)
        return saved

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`; a local folder without the tokenizer's files (a processor saved without
        its tokenizer, or a model folder) raises naming the folder and the fix."""
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(folder):
            if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
                raise FileNotFoundError(
                    f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so no "
                    "VisionLanguageProcessor can be loaded from it: save the processor whole "
                    "(processor.save_pretrained(folder)), or save the language model's tokenizer there "
                    "(tokenizer.save_pretrained(folder))."
                )
            for name in PROCESSOR_JSON_FILES:  # a truncated one would raise a JSONDecodeError naming no file
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    try:
                        with open(path, encoding="utf-8") as file:
                            json.load(file)
                    except (ValueError, UnicodeDecodeError) as error:
                        raise ValueError(
                            f"{path} is not valid JSON ({error}): it is truncated or corrupt, as after an interrupted "
                            "save or copy. Save the processor again (processor.save_pretrained(folder)) or restore "
                            "the file."
                        ) from None
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_model_config(cls, config, image_processor, tokenizer, **kwargs) -> VisionLanguageProcessor:
        """A processor whose image-token count comes from the model's adapter and tower grid (one source of truth)."""
        from .modeling_vlm import num_image_tokens_for

        kept = config.prefix_tokens if config.keep_prefix_tokens else 0
        kwargs = {"adapter_config": config.adapter_config, "kept_prefix_tokens": kept, **kwargs}
        return cls(image_processor, tokenizer, num_image_tokens=num_image_tokens_for(config), **kwargs)

    # ---- images ----------------------------------------------------------------------------------------------

    def process_images(self, images: Sequence[Image.Image], return_tensors: str = "pt") -> torch.Tensor:
        """RGB images -> the tower's `pixel_values` `(I, C, H, W)`, padded to squares first with
        `image_aspect_ratio="pad"`."""
        images = list(images)
        if self.image_aspect_ratio == "pad":
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            images = [pad_to_square(image, mean) for image in images]
        return self.image_processor(images=images, return_tensors=return_tensors)["pixel_values"]

    def preprocess_images(self, images: Sequence, return_tensors: str = "pt") -> tuple[dict, list[list[int]]]:
        """Images -> (the model's image inputs, each image's token ids in the text), for any `image_mode`.

        fixed: `{"pixel_values": (I, C, H, W)}`; native: `pixel_values (I, N, C*P*P)`, `pixel_attention_mask`,
        `spatial_shapes`; tiles: `pixel_values (T, C, H, W)` and `image_tiles (I, 2)`. The ids replace each `<image>`
        tag in order (a run of placeholders, or a split image's `tile_layout`).
        """
        from .modeling_vlm import image_token_count, tile_layout

        images = [_as_rgb(image) for image in images]
        tile = [self.image_token_id] * self.num_image_tokens
        if self.image_mode == "fixed":
            return {"pixel_values": self.process_images(images, return_tensors)}, [tile for _ in images]
        if self.image_mode == "native":
            inputs = dict(self.image_processor(images=images, return_tensors=return_tensors))
            layouts = [
                [self.image_token_id]
                * image_token_count(self.adapter_config, self.kept_prefix_tokens, (int(h), int(w)))
                for h, w in inputs["spatial_shapes"].tolist()
            ]
            return inputs, layouts
        tile_size = output_size(self.image_processor)
        tiles, grids = [], []
        for image in images:
            pieces, rows, columns = split_image(image, tile_size, self.max_tiles)
            tiles += pieces
            grids.append((rows, columns))
        inputs = {"pixel_values": self.process_images(tiles, return_tensors), "image_tiles": torch.tensor(grids)}
        separators = self.tile_separator_token_ids
        return inputs, [tile_layout(rows, columns, tile, *separators) for rows, columns in grids]

    # ---- plain text + images (inference, user scripts) -------------------------------------------------------

    def expand_image_tokens(self, text: str, layouts: Sequence[list[int]] | None = None) -> str:
        """Each `<image>` tag -> `num_image_tokens` placeholder tokens; with `layouts` (from `preprocess_images`),
        the k-th tag -> the tokens of `layouts[k]` (native and tiles modes)."""
        if layouts is None:
            if self.image_mode != "fixed" and self.image_token in text:
                raise ValueError(
                    f"image_mode={self.image_mode!r}: each image's tokens depend on the image; pass the layouts from "
                    "processor.preprocess_images(images) (or call the processor with the images)."
                )
            return text.replace(self.image_token, self.image_token * self.num_image_tokens)
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(layouts):
            raise ValueError(f"The text has {len(parts) - 1} {self.image_token} tags but {len(layouts)} layouts.")
        expanded = [parts[0]]
        for layout, part in zip(layouts, parts[1:], strict=True):
            expanded += ["".join(self.tokenizer.convert_ids_to_tokens(layout)), part]
        return "".join(expanded)

    def __call__(self, images=None, text=None, padding=True, return_tensors="pt", **kwargs) -> BatchFeature:
        """Tokenise `text` (a string or list) with expanded `<image>` tags and process `images` (flat, in tag order).

        Returns input_ids, attention_mask and, with images, pixel_values `(I, C, H, W)`.
        """
        if text is None:
            raise ValueError("text is required: the prompt(s), with one <image> tag per image.")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {[type(t).__name__ for t in texts]}.")
        flat_images = _flatten(images)
        num_tags = sum(t.count(self.image_token) for t in texts)
        if num_tags != len(flat_images):
            raise ValueError(
                f"The text has {num_tags} {self.image_token} tags but {len(flat_images)} images were given: pass one "
                "image per tag, in order."
            )
        inputs, layouts = self.preprocess_images(flat_images, return_tensors) if flat_images else ({}, [])
        expanded, first = [], 0
        for t in texts:
            tags = t.count(self.image_token)
            expanded.append(self.expand_image_tokens(t, layouts[first : first + tags]) if tags else t)
            first += tags
        encoding = self.tokenizer(
            expanded,
            padding=padding,
            return_tensors=return_tensors,
            add_special_tokens=kwargs.pop("add_special_tokens", True),
            **kwargs,
        )
        return BatchFeature(data={**encoding, **inputs}, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template=None, images=None, **kwargs):
        """transformers' `ProcessorMixin.apply_chat_template`, for messages in either form: string contents with
        `<image>` tags, or transformers' content lists (`[{"type": "image"}, {"type": "text", "text": ...}]`).

        The messages are normalised first (:func:`normalize_messages`: a misspelt role is refused), so the chat
        template sees string contents, as in training. The images come from `images=` (flat in tag order, or one list
        per conversation) or from the image parts themselves (`{"type": "image", "image": PIL image}`, or a local
        `"path"`/`"url"`), as in transformers; with `tokenize=True, return_dict=True` the result is this processor's
        `__call__` on the rendered text: input_ids, attention_mask, pixel_values.
        """
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        normalized = [normalize_messages(messages, self.image_token) for messages in conversations]
        if not all(normalized):
            raise ValueError("apply_chat_template got an empty conversation: give at least one message.")
        inline = [_inline_images(messages) for messages in conversations]
        if any(inline):
            if images is not None:
                raise ValueError(
                    "Images were given both inside the messages' image parts and as images=...: give each image once."
                )
            images = inline if batched else inline[0]
        if images is not None:  # where transformers looks for them (it warns when they come in **kwargs)
            kwargs["processor_kwargs"] = {**(kwargs.get("processor_kwargs") or {}), "images": images}
        return super().apply_chat_template(normalized if batched else normalized[0], chat_template, **kwargs)

    # ---- conversations (training, evaluation) ---------------------------------------------------------------

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, chat_template: str | None = None
    ) -> str:
        """The conversation as text through the chat template (`<image>` tags not yet expanded)."""
        return self.tokenizer.apply_chat_template(
            normalize_messages(messages, self.image_token),
            chat_template=chat_template or self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def supervised_spans(
        self, messages: Sequence[Message], chat_template: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of the assistant turns in it.

        Each assistant turn's span is what the template adds between the prompt up to it (with the generation prompt)
        and the conversation through it: the answer and its end-of-turn marker. This works for any template that
        renders a conversation's prefix as a prefix of its text, which chat templates do; others raise
        `ChatTemplateError`.

        The conversation is rendered once. The span boundaries come from a layout of the template for the same
        sequence of roles (rendered once per role sequence, with placeholder contents); when putting the real
        contents into that layout does not give the real rendering (a template that edits or branches on the
        content), the prefixes are rendered one by one instead.
        """
        template = chat_template or self.chat_template
        messages = normalize_messages(messages, self.image_token)
        full = self.render(messages, chat_template=template)
        layout = self._layout(tuple(m["role"] for m in messages), template)
        if layout is not None:
            pieces, boundaries = layout
            contents = [m["content"] for m in messages]
            if "".join(p + c for p, c in zip(pieces, [*contents, ""], strict=True)) == full:
                shift = [0]  # shift[k]: how much longer the first k contents are than their sentinels
                for k, content in enumerate(contents):
                    shift.append(shift[-1] + len(content) - len(_sentinel(k)))
                return full, [(b + shift[i], e + shift[j]) for (b, i), (e, j) in boundaries]
        return full, self._spans_by_prefix(messages, full, template)

    def _spans_by_prefix(self, messages: list[Message], full: str, template: str) -> list[tuple[int, int]]:
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True, chat_template=template)
            through = self.render(messages[: index + 1], chat_template=template)
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatTemplateError(
                    "The chat template does not render conversation prefixes as text prefixes, so the answer spans "
                    f"cannot be found (message {index}: the prompt before it renders as {before[-60:]!r}, the "
                    f"conversation through it as {through[-60:]!r}); use a template where it does "
                    "(--chat-template / chat_template=...)."
                )
            spans.append((len(before), len(through)))
        return spans

    def _layout(self, roles: tuple[str, ...], template: str):
        """The template's text around each content for this role sequence, and the answer-span boundaries as
        (offset in the layout, number of contents before it); None when the template edits the contents."""
        key = (roles, template)
        if key not in self._layouts:
            if len(self._layouts) >= 1024:
                self._layouts.clear()
            self._layouts[key] = self._build_layout(roles, template)
        return self._layouts[key]

    def _build_layout(self, roles: tuple[str, ...], template: str):
        sentinels = [_sentinel(i) for i in range(len(roles))]
        skeleton = [{"role": r, "content": s} for r, s in zip(roles, sentinels, strict=True)]
        full = self.render(skeleton, chat_template=template)
        positions = [full.find(s) for s in sentinels]
        if any(p < 0 or full.count(s) != 1 for p, s in zip(positions, sentinels, strict=True)) or positions != sorted(
            positions
        ):
            return None  # the template drops, repeats or reorders contents (e.g. "plain" drops the question)
        pieces, cursor = [], 0
        for position, sentinel in zip(positions, sentinels, strict=True):
            pieces.append(full[cursor:position])
            cursor = position + len(sentinel)
        pieces.append(full[cursor:])

        def locate(offset: int) -> tuple[int, int]:
            before = sum(1 for p, s in zip(positions, sentinels, strict=True) if p + len(s) <= offset)
            if any(p < offset < p + len(s) for p, s in zip(positions, sentinels, strict=True)):
                raise ChatTemplateError("an answer span starts or ends inside a message's content")
            return offset, before

        try:
            spans = self._spans_by_prefix(skeleton, full, template)
            return pieces, [(locate(b), locate(e)) for b, e in spans]
        except ChatTemplateError:
            return None  # the per-conversation path raises with the details

    def encode_conversation(
        self,
        messages: Sequence,
        max_length: int | None = None,
        chat_template: str | None = None,
        image_layouts: Sequence[list[int]] | None = None,
    ) -> dict[str, list[int]]:
        """Token ids and labels of one conversation: labels are the ids on assistant turns, -100 elsewhere.

        Args:
            messages: `[{"role", "content"}]` (content a string with `<image>` tags, or transformers' list of parts).
            max_length: refuse conversations longer than this many tokens (image tokens included).
            chat_template: Jinja text to render with instead of the processor's (e.g. `PLAIN_CHAT_TEMPLATE`).
            image_layouts: each image's token ids, in tag order (`preprocess_images`); needed in native and tiles
                modes, where they depend on the image. None: `num_image_tokens` placeholders per tag.

        Raises:
            ConversationTooLongError: longer than `max_length` (never truncated: that could cut an image span or the
                answer).
            ChatTemplateError: the template's rendering can't be split into prompt and answers.
        """
        messages = normalize_messages(messages, self.image_token)
        text, spans = self.supervised_spans(messages, chat_template=chat_template)
        # tokenised with one placeholder per tag (a special token: the text around it splits the same), then each
        # placeholder repeated num_image_tokens times
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tags = text.count(self.image_token)
        if image_layouts is None and self.image_mode != "fixed" and tags:
            raise ValueError(
                f"image_mode={self.image_mode!r}: an image's tokens depend on the image, so encode_conversation needs "
                "image_layouts (from processor.preprocess_images(images)); encode_conversations does it for you."
            )
        if image_layouts is not None and len(image_layouts) != tags:
            raise ValueError(f"The conversation has {tags} {self.image_token} tags but {len(image_layouts)} layouts.")
        layouts = iter(image_layouts or [])
        input_ids, labels = [], []
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
            if token == self.image_token_id:
                layout = next(layouts) if image_layouts is not None else [token] * self.num_image_tokens
                input_ids += layout
                labels += [IGNORE_INDEX] * len(layout)
                continue
            input_ids.append(token)
            supervised = end > start and any(s <= start and end <= e for s, e in spans)
            labels.append(token if supervised else IGNORE_INDEX)
        if max_length is not None and len(input_ids) > max_length:
            images = f"{tags} images x {self.num_image_tokens} tokens"
            if image_layouts is not None:
                images = f"{tags} images, {sum(map(len, image_layouts))} image tokens"
            raise ConversationTooLongError(
                f"The conversation is {len(input_ids)} tokens long, over max_length={max_length} ({images}): raise "
                "max_length or drop the sample (truncating would cut an image span or the answer)."
            )
        return {"input_ids": input_ids, "labels": labels}

    def encode_conversations(
        self,
        conversations: Sequence[Sequence[Message]],
        images=None,
        max_length: int | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """A padded training batch: input_ids, attention_mask, labels and pixel_values (images flat, in tag order).

        Args:
            conversations: per sample, a list of `{"role": "user" | "assistant" | "system", "content": str}` with
                `<image>` tags in the content.
            images: per sample, a list of images (or None for a text-only sample); or one flat list in tag order.
        """
        conversations = [normalize_messages(messages, self.image_token) for messages in conversations]
        flat_images = _flatten(images)
        tags = [sum(m["content"].count(self.image_token) for m in messages) for messages in conversations]
        if sum(tags) != len(flat_images):
            per_sample = ", ".join(f"sample {i}: {n}" for i, n in enumerate(tags))
            raise ValueError(
                f"The conversations have {sum(tags)} {self.image_token} tags ({per_sample}) but {len(flat_images)} "
                "images were given: pass one image per tag, in order."
            )
        inputs, layouts = self.preprocess_images(flat_images, return_tensors) if flat_images else ({}, None)
        encoded, first = [], 0
        for messages, count in zip(conversations, tags, strict=True):
            own = None if layouts is None else layouts[first : first + count]
            encoded.append(self.encode_conversation(messages, max_length=max_length, image_layouts=own))
            first += count
        batch = self.pad_encoded(encoded, return_tensors=return_tensors)
        batch.update(inputs)
        return batch

    def pad_encoded(self, encoded: Sequence[dict[str, list[int]]], return_tensors: str = "pt") -> BatchFeature:
        """Pad conversations already encoded by `encode_conversation` (so a data set can encode each one once):
        input_ids, attention_mask and labels (-100 on padding), on the tokenizer's padding side."""
        padded = self.tokenizer.pad({"input_ids": [e["input_ids"] for e in encoded]}, return_tensors=return_tensors)
        labels = torch.full_like(padded["input_ids"], IGNORE_INDEX)
        left = self.tokenizer.padding_side == "left"
        for row, sample in enumerate(encoded):
            length = len(sample["labels"])
            columns = slice(labels.shape[1] - length, None) if left else slice(0, length)
            labels[row, columns] = torch.tensor(sample["labels"])
        return BatchFeature(data={**padded, "labels": labels})

    def prompt(self, messages: Sequence, chat_template: str | None = None) -> str:
        """The text to generate the next assistant turn from (expanded `<image>` tags not included)."""
        messages = normalize_messages(messages, self.image_token)
        return self.render(messages, add_generation_prompt=True, chat_template=chat_template)


def output_size(image_processor) -> tuple[int, int]:
    """(height, width) of the images an image processor outputs: its crop when it centre-crops (CLIP), else its
    size (ViT's height/width; a square for a shortest edge alone)."""
    crop = getattr(image_processor, "crop_size", None)
    size = crop if getattr(image_processor, "do_center_crop", False) and crop else image_processor.size
    size = dict(size or {})
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(
        f"Can't tell the output size of {type(image_processor).__name__} (size={size}) for image splitting: give it "
        "size={'height': H, 'width': W} (the tower's image size)."
    )


def split_image(image: Image.Image, tile_size: tuple[int, int], max_tiles: int):
    """Image splitting: (tiles row-major + the whole image as thumbnail, rows, columns).

    The long side gets `min(max_tiles, ceil(long / tile))` tiles and the short side `ceil` of what keeps the aspect
    ratio; the image is resized to exactly that many tiles (a slight stretch within the last tile) and cut. A 1x1
    grid gives the image alone (its thumbnail)."""
    tile_h, tile_w = tile_size
    width, height = image.size
    scale = min(max_tiles, max(math.ceil(height / tile_h), math.ceil(width / tile_w)))
    scale /= max(height / tile_h, width / tile_w)
    rows = max(1, min(max_tiles, math.ceil(height * scale / tile_h - 1e-6)))
    columns = max(1, min(max_tiles, math.ceil(width * scale / tile_w - 1e-6)))
    if rows * columns == 1:
        return [image], 1, 1
    resized = image.resize((columns * tile_w, rows * tile_h), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
        for r in range(rows)
        for c in range(columns)
    ]
    return [*tiles, image], rows, columns


def _sentinel(index: int) -> str:
    # private-use characters: no template trims them, matches them or finds them in real text
    return f"\ue000{index}\ue001"


def _as_rgb(image):
    """An image file (its path) or a PIL image of any mode as an RGB PIL image; tensors and arrays are passed to the
    image processor as they are."""
    from ..data.images import load_image, to_rgb

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return to_rgb(image)
    return image


def _flatten(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        if item is None:
            continue
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "PLAIN_CHAT_TEMPLATE",
    "ChatTemplateError",
    "ConversationTooLongError",
    "VisionLanguageProcessor",
    "normalize_messages",
    "pad_to_square",
    "resolve_chat_template",
    "split_image",
]
