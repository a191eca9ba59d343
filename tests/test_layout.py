"""The package layout: one sub-package per concern, imports without cycles, and the old flat module paths still work."""

from __future__ import annotations

import ast
import importlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import vlm_vision

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm_vision"
SUBPACKAGES = ("encoder", "vlm", "adapters", "conversion", "data", "training", "evaluation", "export", "analysis")
# The names each old module that is now a package exported (its `__all__` in the flat layout).
OLD_PACKAGE_NAMES = {
    "conversion": ["SOURCE_FORMATS", "ConvertedCheckpoint", "convert", "convert_checkpoint", "main", "read_state_dict"],
    "evaluation": ["accuracy_by", "caption_scores", "exact_match", "normalize_vqa_answer", "vqa_accuracy"],
    "export": ["check_out_dir", "replace_directory_atomically", "save_folder_atomically", "write_vlm_card"],
    "analysis": [
        "attention_rollout",
        "attention_rollout_map",
        "mean_attention_distance",
        "position_embedding_similarity",
    ],
}


@pytest.mark.parametrize("old", sorted(vlm_vision.MOVED_MODULES))
def test_an_old_module_path_is_the_moved_module(old):
    new = f"vlm_vision.{vlm_vision.MOVED_MODULES[old]}"
    module = importlib.import_module(f"vlm_vision.{old}")
    assert module is importlib.import_module(new)
    assert module is getattr(vlm_vision, old)
    # the module keeps its own name and spec (pickles, loggers and transformers' code copies name the new path)
    assert module.__name__ == module.__spec__.name == new
    assert Path(module.__file__).is_relative_to(PACKAGE)


def test_old_module_paths_import_in_every_form_in_a_fresh_process():
    code = (
        "import importlib\n"
        "import vlm_vision.modeling_vlm_vit\n"
        "from vlm_vision.modeling_vlm_vit import VisionTransformerModel\n"
        "from vlm_vision.configuration_vlm import VisionLanguageConfig\n"
        "from vlm_vision import processing_vlm\n"
        "import vlm_vision.encoder.modeling_vit as new\n"
        "assert vlm_vision.modeling_vlm_vit is new and VisionTransformerModel is new.VisionTransformerModel\n"
        "assert importlib.import_module('vlm_vision.checkpoint').__name__ == 'vlm_vision.export.encoder_folder'\n"
        "assert processing_vlm.__name__ == 'vlm_vision.vlm.processing_vlm'\n"
        "try:\n"
        "    import vlm_vision.no_such_module\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('an unknown name imported')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok"]


@pytest.mark.parametrize("old", sorted(OLD_PACKAGE_NAMES))
def test_an_old_module_that_is_now_a_package_keeps_its_names(old):
    package = importlib.import_module(f"vlm_vision.{old}")
    assert hasattr(package, "__path__")
    missing = [name for name in OLD_PACKAGE_NAMES[old] if not hasattr(package, name)]
    assert not missing, (old, missing)


def test_every_subpackage_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {f"vlm_vision.{p.parent.relative_to(PACKAGE)}".replace("/", ".") for p in PACKAGE.glob("*/__init__.py")}
    assert found | {"vlm_vision", "vlm_vision.adapters"} <= packages, sorted(found - packages)
    assert {f"vlm_vision.{name}" for name in SUBPACKAGES} <= packages


def _modules() -> dict[str, Path]:
    """Every module of the package, by its import name (`adapters/` installs as `vlm_vision.adapters`)."""
    modules = {}
    for root, prefix in ((PACKAGE, "vlm_vision"), (ROOT / "adapters", "vlm_vision.adapters")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The package modules that `name` imports (relative imports resolved; `from . import x` gives the module x)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "vlm_vision":
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vlm_vision")
    return found


def test_the_module_level_imports_have_no_cycle():
    modules = _modules()
    # explicit imports only: the implicit import of a module's parent packages finds them already in sys.modules
    graph = {name: _imports(name, path, top_level_only=True) & set(modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*stack[stack.index(name) :], name]
            # a package's __init__ importing its own sub-modules is the one loop Python resolves by design
            if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in itertools.pairwise(cycle)):
                raise AssertionError(" -> ".join(cycle))
            return
        state[name] = 1
        for imported in sorted(graph[name]):
            visit(imported, [*stack, name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def test_the_encoder_imports_only_torch_transformers_and_its_siblings():
    """Its files are copied into every saved encoder folder (transformers' `register_for_auto_class`)."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("vlm_vision.encoder."):
            outside = {m for m in _imports(name, path, top_level_only=False) if not m.startswith("vlm_vision.encoder")}
            assert not outside, (name, outside)


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_imports_first_in_a_fresh_process(subpackage):
    code = f"import vlm_vision.{subpackage}; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
