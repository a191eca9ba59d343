"""A saved VLM folder loads with `trust_remote_code=True` in a process that cannot import vlm-vision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from tests.test_vlm_native import build, strip
from vlm_vision import remote_code

# the package and its adapters cannot be imported in this process; it runs outside the repository
BLOCKER = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vlm_vision", "adapters", "tests"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Blocker())
sys.path = [p for p in sys.path if p not in ("", ".")]
"""


@pytest.fixture(scope="module", params=["fixed", "native"])
def saved(request, tmp_path_factory):
    """A tiny VLM folder: fixed-size images (ViT's own image processor) or native grids (ours, remote code too)."""
    model, processor = build(request.param)
    folder = tmp_path_factory.mktemp(f"vlm-{request.param}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def test_the_folder_carries_flat_code_and_auto_map(saved):
    _, _, folder = saved
    assert set(remote_code.CODE_FILES) <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == remote_code.MODEL_AUTO_MAP
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == remote_code.PROCESSOR_AUTO_MAP
    native = processor_config["image_processor"]["image_processor_type"] == "VisionTransformerImageProcessor"
    assert processor_config["image_processor"].get("auto_map") == (
        remote_code.IMAGE_PROCESSOR_AUTO_MAP if native else None
    )
    # the copies import only these and each other (transformers' own scan, the one check_imports runs)
    allowed = {"torch", "transformers", "numpy", "PIL", "safetensors"} | set(sys.stdlib_module_names)
    for name in remote_code.CODE_FILES:
        assert set(get_imports(folder / name)) <= allowed, (name, set(get_imports(folder / name)) - allowed)
        assert {f"{m}.py" for m in get_relative_imports(folder / name)} <= set(remote_code.CODE_FILES), name


def test_an_import_the_flat_folder_cannot_follow_is_refused(monkeypatch):
    monkeypatch.setitem(remote_code.REWRITES, "processing_vlm.py", [])
    with pytest.raises(RuntimeError, match=r"imports \.\.data\.images.*CODE_FILES"):
        remote_code.code_sources()
    monkeypatch.setitem(remote_code.REWRITES, "processing_vlm.py", [("from .gone import", "from .images import")])
    with pytest.raises(RuntimeError, match=r"'from \.gone import' is gone; update remote_code\.REWRITES"):
        remote_code.code_sources()


def test_remote_code_without_the_package_gives_the_same_logits_and_generation(saved, tmp_path):
    model, processor, folder = saved
    messages = [{"role": "user", "content": "<image>\nwhat is the blue shape?"}]
    image = strip(40, 24, seed=3)  # not square: native mode keeps its aspect ratio
    image.save(tmp_path / "image.png")
    inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.save({"logits": expected, "generated": generated, "inputs": dict(inputs)}, tmp_path / "expected.pt")
    script = BLOCKER + textwrap.dedent(
        f"""
        try:
            import vlm_vision
        except ImportError:
            pass
        else:
            raise SystemExit("vlm_vision was importable")
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = {str(folder)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert processor.image_mode == {processor.image_mode!r}, processor.image_mode
        assert type(processor.image_processor).__name__ == {type(processor.image_processor).__name__!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        messages = {messages!r}
        image = Image.open({str(tmp_path / "image.png")!r})
        inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
        for key, value in expected["inputs"].items():
            torch.testing.assert_close(inputs[key], value, rtol=0, atol=0, msg=key)
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
        assert torch.equal(generated, expected["generated"]), (generated, expected["generated"])
        # a model and processor loaded as remote code save a folder that loads the same way
        model.save_pretrained({str(tmp_path / "resaved")!r})
        processor.save_pretrained({str(tmp_path / "resaved")!r})
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "resaved")!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(tmp_path / "resaved")!r}, trust_remote_code=True)
        inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(**inputs).logits, expected["logits"], rtol=0, atol=1e-5)
        print("ok", generated.shape[1] - inputs["input_ids"].shape[1])
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # the last line: DeepSpeed, where installed, logs to stdout when transformers imports it
    assert result.stdout.strip().splitlines()[-1].split() == ["ok", "4"]


def test_the_in_package_classes_still_load_the_folder_without_trust_remote_code(saved):
    _, _, folder = saved
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__module__ == "vlm_vision.vlm.modeling_vlm"
    assert type(processor).__module__ == "vlm_vision.vlm.processing_vlm"
