"""What every adapter shares: the config base class, the boundary checks, the output norm/scale, save and load.

An adapter maps vision tokens laid out row-major on a ``(grid_h, grid_w)`` patch grid to language-model embeddings::

    image_features (B, N, D_vision), N == grid_h * grid_w   ->   (B, N', D_lm), N' == num_output_tokens(grid_h, grid_w)

Prefix tokens (CLS, registers) are removed by the caller (a VLM that keeps them projects them apart, with
``forward_prefix_tokens``). A subclass implements two things: ``project(features, grid_h, grid_w)`` (the maths, on
checked input) and, where N' != N, ``_count_output_tokens(grid_h, grid_w)``. This module does the rest once for all
of them:

- ``num_output_tokens(grid_h, grid_w)``: the one source of truth for N' (the processor uses it to expand ``<image>``
  into that many placeholders, the model to check the count); it also refuses grids the adapter cannot take, so a bad
  grid fails in the processor before any forward pass.
- ``forward(image_features, grid_size)``: checks the input once, calls ``project``, then applies
  ``output = output_scale * output_norm(project(x))`` (norm first, then scale; both optional, see ``AdapterConfig``).
- ``save_pretrained(directory)`` / ``from_pretrained(directory)``: ``projector_config.json`` and
  ``projector.safetensors``, written as a pair atomically (a failed save leaves the previous pair), loaded strictly.
  ``Adapter.from_pretrained`` rebuilds whichever type the config names.

Init, for every adapter: ``nn.Linear`` weights trunc-normal(std=0.02) and biases zero (the ViT rule; the original
LLaVA code keeps torch's default instead); norms weight one, bias zero; learned queries trunc-normal(std=0.02).
``reset_parameters()`` re-applies it. ``_init_weights(module)`` uses ``transformers.initialization``, which skips
tensors a ``PreTrainedModel`` has already loaded, so a model that holds an adapter can call it from its own
``_init_weights``.

Subclasses register themselves by type name (their config's ``adapter_type``) in ``ADAPTER_CLASSES`` and
``ADAPTER_CONFIGS`` when they are defined; ``vlm_vision.adapters`` imports all four, so the registry is always full.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import operator
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import initialization as init

logger = logging.getLogger(__name__)

CONFIG_NAME = "projector_config.json"
WEIGHTS_NAME = "projector.safetensors"
OUTPUT_NORMS = (None, "layernorm", "rmsnorm")
INIT_STD = 0.02

ADAPTER_CLASSES: dict[str, type[Adapter]] = {}
ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {}


def check_positive_int(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is a positive int (bools refused: ``True`` is not a size)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _grid_side(name: str, value: Any) -> int:
    """A grid side as a Python int; numpy ints and one-element integer tensors are accepted."""
    try:
        side = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    check_positive_int(name, side)
    return side


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every adapter config has. Subclasses add their own and fix ``adapter_type``.

    Args:
        vision_hidden_size: D_vision, the width of the incoming vision tokens.
        text_hidden_size: D_lm, the language model's embedding width (the output width).
        output_norm: ``None`` (default, as LLaVA), ``"layernorm"`` or ``"rmsnorm"``: a norm over D_lm applied to the
            output, with a learned weight (and bias for layernorm) initialised to one (zero), so at init each output
            token has zero mean and unit variance (layernorm) or unit root-mean-square (rmsnorm), up to ``norm_eps``.
        output_scale: multiplies the output after the norm (for LMs whose own embeddings live at another scale, e.g.
            Gemma's sqrt(D_lm)). Default 1.0.
        norm_eps: epsilon of every norm in the adapter.
    """

    adapter_type: str = field(default="", init=False)
    vision_hidden_size: int
    text_hidden_size: int
    output_norm: str | None = None
    output_scale: float = 1.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig:
            names = [config_class.__name__ for config_class in ADAPTER_CONFIGS.values()]
            raise TypeError(f"AdapterConfig is a base class; use one of {names}")
        check_positive_int("vision_hidden_size", self.vision_hidden_size)
        check_positive_int("text_hidden_size", self.text_hidden_size)
        if self.output_norm not in OUTPUT_NORMS:
            raise ValueError(f"output_norm={self.output_norm!r} is not known; use one of {list(OUTPUT_NORMS)}")
        for name in ("output_scale", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for config_field in dataclasses.fields(self):  # e.g. `bias`: "yes" would silently count as True
            if config_field.type in ("bool", bool) and not isinstance(getattr(self, config_field.name), bool):
                raise ValueError(f"{config_field.name} must be True or False, got {getattr(self, config_field.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that ``from_dict`` (or ``adapter_config_from_dict``) turns back into an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> AdapterConfig:
        """Builds this config from ``to_dict()`` output; unknown keys are an error (they are usually typos).

        ``AdapterConfig.from_dict`` builds whichever type ``config_dict["adapter_type"]`` names.
        """
        if cls is AdapterConfig:
            return adapter_config_from_dict(config_dict)
        config_dict = dict(config_dict)
        adapter_type = config_dict.pop("adapter_type", cls.adapter_type)
        if adapter_type != cls.adapter_type:
            raise ValueError(
                f"{cls.__name__} got adapter_type={adapter_type!r}, expected {cls.adapter_type!r}; "
                "use adapter_config_from_dict to build whichever type the dict names"
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            matches = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
            hints = [f"{name!r} -> {close[0]!r}?" for name, close in matches.items() if close]
            raise ValueError(
                f"unknown keys {unknown} for a {adapter_type!r} adapter config"
                + (f" (did you mean: {', '.join(hints)})" if hints else "")
                + f"; known keys: {sorted(known)}"
            )
        required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING]
        if missing := [name for name in required if name not in config_dict]:
            raise ValueError(
                f"a {adapter_type!r} adapter config needs {missing}: vision_hidden_size is the vision tower's "
                "hidden size (times the number of feature layers concatenated), text_hidden_size the language "
                "model's embedding width"
            )
        return cls(**config_dict)


def adapter_config_from_dict(config_dict: dict[str, Any]) -> AdapterConfig:
    """Builds the config class that ``config_dict["adapter_type"]`` names."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"an adapter config dict is needed, got {type(config_dict).__name__}")
    adapter_type = config_dict.get("adapter_type")
    if adapter_type not in ADAPTER_CONFIGS:
        hint = " (this is a peft adapter config, not a projection adapter)" if "peft_type" in config_dict else ""
        missing = "" if "adapter_type" in config_dict or hint else '; the dict needs an "adapter_type" key'
        raise ValueError(
            f"unknown adapter_type {adapter_type!r}{hint}; known adapter types: {sorted(ADAPTER_CONFIGS)}{missing}"
        )
    return ADAPTER_CONFIGS[adapter_type].from_dict(config_dict)


def build_adapter(config: dict[str, Any] | AdapterConfig) -> Adapter:
    """Builds a freshly initialised adapter from a config object or its ``to_dict()`` form."""
    if isinstance(config, dict):
        config = adapter_config_from_dict(config)
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"build_adapter takes an AdapterConfig or a dict, got {type(config).__name__}, e.g. "
            '{"adapter_type": "mlp", "vision_hidden_size": 768, "text_hidden_size": 576}'
        )
    return ADAPTER_CLASSES[config.adapter_type](config)


def check_features(name: str, features: Any) -> None:
    """Raises TypeError unless ``features`` is a float tensor (numpy arrays, lists and integer tensors refused)."""
    if not isinstance(features, torch.Tensor):
        kind = type(features).__module__.split(".")[0] + "." + type(features).__name__
        raise TypeError(
            f"{name} must be a torch.Tensor (batch, tokens, vision_hidden_size), got {kind}; the vision tower's "
            "outputs are tensors (torch.from_numpy for an array)"
        )
    if not features.is_floating_point():
        raise TypeError(f"{name} has dtype {features.dtype}; pass the vision tower's float features")


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # same file system: no data is copied
    except OSError:
        shutil.copy2(source, destination)


class Adapter(nn.Module):
    """Base class of the projection adapters (see the module docstring for the contract).

    Args:
        config: the adapter's config; subclasses take their own config class.
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    supports_prefix_tokens: ClassVar[bool] = True  # see forward_prefix_tokens

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Register only classes that name their own config, so a user subclass of MLPAdapter does not replace it.
        if "config_class" in cls.__dict__:
            adapter_type = cls.config_class.adapter_type
            taken = ADAPTER_CLASSES.get(adapter_type)
            # the same class defined again (a module reload) replaces itself; another class may not take the name
            if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"adapter_type {adapter_type!r} is already taken by {taken}")
            ADAPTER_CLASSES[adapter_type] = cls
            ADAPTER_CONFIGS[adapter_type] = cls.config_class

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        # Exact type: a PixelShuffleAdapterConfig is an MLPAdapterConfig, but an MLPAdapter would ignore its ratio.
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def _build_output_norm(self) -> None:
        """Creates ``self.output_norm``; subclasses call it at the end of ``__init__``, then ``reset_parameters()``."""
        config = self.config
        if config.output_norm == "layernorm":
            self.output_norm = nn.LayerNorm(config.text_hidden_size, eps=config.norm_eps)
        elif config.output_norm == "rmsnorm":
            self.output_norm = nn.RMSNorm(config.text_hidden_size, eps=config.norm_eps)
        else:
            self.output_norm = nn.Identity()  # no parameters: the state dict stays that of the bare projector

    def _init_weights(self, module: nn.Module) -> None:
        """The init rule of the module docstring, for one module (also usable from a PreTrainedModel's init hook)."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=INIT_STD)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        """(Re-)initialises every parameter with the rule of the module docstring."""
        self.apply(self._init_weights)

    def num_output_tokens(self, grid_h: int, grid_w: int) -> int:
        """N', the number of tokens ``forward`` returns per image for a ``(grid_h, grid_w)`` patch grid.

        Raises:
            ValueError: if the grid is not positive ints, or the adapter cannot take it (pixel_shuffle: a side not
                divisible by the ratio).
        """
        return self._count_output_tokens(_grid_side("grid_h", grid_h), _grid_side("grid_w", grid_w))

    def _count_output_tokens(self, grid_h: int, grid_w: int) -> int:
        return grid_h * grid_w

    def project(self, image_features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """The adapter's maths on checked input: (B, grid_h * grid_w, D_vision) -> (B, N', D_lm)."""
        raise NotImplementedError

    def forward(self, image_features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Projects vision tokens into the language model's embedding space.

        Args:
            image_features: (B, N, D_vision), patch tokens only, row-major on the grid.
            grid_size: ``(grid_h, grid_w)`` with ``grid_h * grid_w == N``; one grid for the whole batch.

        Returns:
            (B, N', D_lm) with ``N' == self.num_output_tokens(grid_h, grid_w)``.
        """
        if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
            raise ValueError(f"grid_size must be a (grid_h, grid_w) pair such as (14, 14), got {grid_size!r}")
        grid_h, grid_w = _grid_side("grid_h", grid_size[0]), _grid_side("grid_w", grid_size[1])
        self.num_output_tokens(grid_h, grid_w)  # refuses grids this adapter cannot take
        check_features("image_features", image_features)
        if image_features.dim() != 3:
            raise ValueError(
                f"image_features must be 3-D (batch, num_patches, vision_hidden_size), got shape "
                f"{tuple(image_features.shape)}; add a batch dimension with unsqueeze(0) for a single image"
            )
        _, num_tokens, hidden_size = image_features.shape
        if hidden_size != self.config.vision_hidden_size:
            raise ValueError(
                f"image_features has last dimension {hidden_size} (shape {tuple(image_features.shape)}) but this "
                f"adapter expects vision_hidden_size={self.config.vision_hidden_size}; build the adapter with the "
                "vision tower's hidden size (times the number of feature layers if they are concatenated)"
            )
        if num_tokens != grid_h * grid_w:
            raise ValueError(
                f"image_features has {num_tokens} tokens (shape {tuple(image_features.shape)}) but grid_size "
                f"{grid_h}x{grid_w} needs {grid_h * grid_w}; drop prefix tokens (CLS, registers) before the adapter "
                "and pass the patch grid of the image that was encoded"
            )
        return self._output(self.project(self._as_own_dtype(image_features), grid_h, grid_w))

    def _as_own_dtype(self, features: torch.Tensor) -> torch.Tensor:
        """Features of another float dtype (a bf16 tower, an fp32 adapter) are cast, as the encoder casts pixels."""
        parameter = next(self.parameters(), None)
        if parameter is None or torch.is_autocast_enabled(features.device.type):
            return features
        return features.to(parameter.dtype)

    def forward_prefix_tokens(self, prefix_features: torch.Tensor) -> torch.Tensor:
        """Projects the tower's prefix tokens ([CLS], registers) kept as image tokens: (B, P, D_vision) ->
        (B, P, D_lm). A token-wise adapter projects each like a patch token; adapters that mix tokens (the
        resampler) cannot, and say so; pixel_shuffle overrides this."""
        check_features("prefix_features", prefix_features)
        if not self.supports_prefix_tokens:
            raise ValueError(
                f"The {self.config.adapter_type} adapter cannot project prefix tokens ([CLS], registers) on their own; "
                "use keep_prefix_tokens=False, or a linear, mlp or pixel_shuffle adapter"
            )
        return self(prefix_features, (1, prefix_features.shape[1]))

    def _output(self, projected: torch.Tensor) -> torch.Tensor:
        """The shared tail: ``output_scale * output_norm(projected)``."""
        output = self.output_norm(projected)
        if self.config.output_scale != 1.0:
            output = output * self.config.output_scale
        return output

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Writes ``projector_config.json`` and ``projector.safetensors`` into ``directory`` (created if needed).

        ``state_dict`` (default: the module's own) is what to write, e.g. weights gathered by
        ``accelerator.get_state_dict`` when the module's own are partitioned (DeepSpeed ZeRO-3).

        The pair is written as one: into a staging folder next to ``directory``, together with (hard links to) the
        other files ``directory`` already holds, which then replaces ``directory`` in one rename. A save that fails
        (a full disk, an interrupt) leaves the previous pair in place, never a new config beside old weights. The
        names differ from peft's (``adapter_config.json``/``adapter_model.safetensors``), so a projector and a LoRA
        adapter can share a folder.
        """
        from ..export.folders import replace_directory_atomically

        directory = Path(directory).resolve()
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"{directory} is a file: save_pretrained takes a folder to write the adapter into")
        config_json = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        # safetensors refuses non-contiguous tensors.
        own = self.state_dict()
        if state_dict is not None and set(state_dict) != set(own):
            raise ValueError(
                f"state_dict has the keys {sorted(state_dict)[:4]}..., not this adapter's {sorted(own)[:4]}...: pass "
                "the adapter's own entries (a VLM state dict's 'adapter.' entries, the prefix removed)."
            )
        state_dict = own if state_dict is None else state_dict
        state_dict = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            if directory.is_dir():  # keep what else the folder holds (a LoRA adapter, a model)
                for item in directory.iterdir():
                    if item.name in (CONFIG_NAME, WEIGHTS_NAME):
                        continue
                    if item.is_dir():
                        shutil.copytree(item, staging / item.name, copy_function=_link_or_copy, symlinks=True)
                    else:
                        _link_or_copy(str(item), str(staging / item.name))
            (staging / CONFIG_NAME).write_text(config_json, encoding="utf-8")
            save_file(state_dict, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            staging.chmod(directory.stat().st_mode & 0o7777 if directory.is_dir() else 0o755)
            replace_directory_atomically(staging, directory, overwrite=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved %s adapter to %s", self.config.adapter_type, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Adapter:
        """Loads an adapter saved by ``save_pretrained`` from a local folder.

        ``Adapter.from_pretrained`` builds whichever type the config names; ``MLPAdapter.from_pretrained`` also
        checks that it is an mlp adapter. Loading is strict: every key of the file must match a parameter of the same
        shape and every parameter must be in the file.

        Raises:
            FileNotFoundError: the folder lacks ``projector_config.json`` or ``projector.safetensors``.
            ValueError: a file cannot be parsed, the type is wrong, or the weights do not fit the config (the message
                lists missing keys, unexpected keys and shape mismatches).
        """
        directory = os.fspath(directory)
        if os.path.isfile(directory):
            raise NotADirectoryError(f"{directory} is a file: pass the folder save_pretrained wrote")
        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist; save the adapter with save_pretrained({directory!r})")
        try:
            with open(config_path, encoding="utf-8") as f:
                config_dict = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path} is not valid JSON ({error}); re-save the adapter") from error
        if not isinstance(config_dict, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(config_dict).__name__}")
        config = adapter_config_from_dict(config_dict)
        if cls is not Adapter and config.adapter_type != cls.config_class.adapter_type:
            raise ValueError(
                f"{config_path} describes a {config.adapter_type!r} adapter, not {cls.config_class.adapter_type!r}; "
                "load it with Adapter.from_pretrained"
            )
        adapter = build_adapter(config)
        try:
            state_dict = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"could not read {weights_path} ({error}); the file is corrupt or truncated") from error
        _check_state_dict(adapter, state_dict, weights_path)
        adapter.load_state_dict(state_dict, strict=True)
        logger.info("loaded %s adapter from %s", config.adapter_type, directory)
        return adapter


def _check_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raises one ValueError that lists every missing key, unexpected key and shape mismatch at once."""
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{name}: file {found[name]} vs model {expected[name]}"
        for name in sorted(set(expected) & set(found))
        if expected[name] != found[name]
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the weights in {source} do not fit the config next to them: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}; the config and the weights come from different adapters"
        )
