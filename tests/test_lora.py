"""LoRA scoping, freezing, gradient checkpointing and merging on a tiny VLM."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlamaTokenizer

from tests.vlm_helpers import build_vlm, shapes_image, vqa
from vlm_vision.vlm.lora import LoraPreset, LoraSide, apply_lora, lora_config, parameter_table


@pytest.fixture
def vlm(tokenizer_dir):
    return build_vlm(LlamaTokenizer.from_pretrained(tokenizer_dir))


def batch(processor):
    return processor.encode_conversations(
        [vqa("what is the blue shape?", "a blue circle"), vqa("describe the image.", "yes")],
        [[shapes_image(0)], [shapes_image(1)]],
    )


def lora_modules(peft_model) -> set[str]:
    return {
        n.split(".lora_A")[0].removeprefix("base_model.model.")
        for n, _ in peft_model.named_parameters()
        if ".lora_A." in n
    }


@pytest.mark.parametrize(
    ("preset", "sides"),
    [("lm", {"language_model"}), ("vision", {"vision_tower"}), ("both", {"language_model", "vision_tower"})],
)
def test_lora_lands_only_on_the_chosen_sides(vlm, preset, sides):
    model, _ = vlm
    peft_model = apply_lora(model, preset)
    modules = lora_modules(peft_model)
    assert {m.split(".")[0] for m in modules} == sides
    if "vision_tower" in sides:  # every attention/MLP projection of the used blocks
        assert "vision_tower.layers.0.attention.q_proj" in modules and "vision_tower.layers.1.mlp.fc2" in modules
    if "language_model" in sides:
        assert "language_model.model.layers.1.mlp.down_proj" in modules
    assert not any(m.startswith("adapter") for m in modules)


def test_separate_rank_and_alpha_per_side(vlm):
    model, _ = vlm
    preset = LoraPreset(
        lm=LoraSide(r=4, alpha=8, targets=("q_proj",)), vision=LoraSide(r=2, alpha=6, targets=("q_proj",))
    )
    peft_model = apply_lora(model, preset)
    base = peft_model.get_base_model()
    lm_q = base.language_model.model.layers[0].self_attn.q_proj
    vision_q = base.vision_tower.layers[0].attention.q_proj
    assert lm_q.lora_A["default"].weight.shape[0] == 4 and lm_q.scaling["default"] == 8 / 4
    assert vision_q.lora_A["default"].weight.shape[0] == 2 and vision_q.scaling["default"] == 6 / 2


def test_frozen_parameters_get_no_gradient_and_do_not_change_in_a_step(vlm):
    model, processor = vlm
    peft_model = apply_lora(model, "lm")
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    peft_model(**batch(processor)).loss.backward()
    frozen = {n for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("base_model.model.vision_tower.") for n in frozen)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n in frozen)
    optimizer.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not changed & frozen
    assert any(".adapter." in n for n in changed)  # the adapter trains fully (modules_to_save)
    assert any("lora_B" in n for n in changed)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_both_towers_keeps_lora_gradients(vlm, reentrant):
    model, processor = vlm
    model.vision_tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    peft_model = apply_lora(model, "both")
    peft_model.train()
    peft_model(**batch(processor)).loss.backward()
    for side in ("vision_tower", "language_model"):
        # lora_B starts at zero, so at the first step only lora_B has a gradient; the trap zeroes it too
        grads = [p.grad for n, p in peft_model.named_parameters() if side in n and "lora_B" in n and p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), side


def test_merge_and_unload_gives_a_plain_checkpoint_with_the_same_outputs(vlm, tmp_path):
    model, processor = vlm
    peft_model = apply_lora(model, "both")
    with torch.no_grad():  # move away from the identity so that merging matters
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    peft_model.eval()
    inputs = batch(processor)
    expected = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert not any("lora" in n for n in loaded.state_dict())
    torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_parameter_table_counts_each_part(vlm, caplog):
    model, _ = vlm
    with caplog.at_level("INFO", logger="vlm_vision.vlm.lora"):
        peft_model = apply_lora(model, "lm")
    table = parameter_table(peft_model)
    assert "vision_tower" in table and "adapter" in table and "language_model" in table and "lora" in table
    assert table in caplog.text
    total = sum(p.numel() for p in peft_model.parameters())
    assert f"{total - sum(p.numel() for p in peft_model.parameters() if p.requires_grad):,}" in table.splitlines()[-1]


def test_lora_config_errors():
    with pytest.raises(ValueError, match=r"Unknown LoRA preset 'llm'"):
        lora_config("llm")
    with pytest.raises(ValueError, match="at least one side"):
        lora_config(LoraPreset(lm=None, vision=None))
    with pytest.raises(ValueError, match="r and alpha must be positive"):
        LoraSide(r=0)


def reentrant_checkpointing_after_wrapping(peft_model):
    """Checkpoint the tower's blocks with torch's reentrant checkpoint, switched on after LoRA is applied."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for layer in peft_model.get_base_model().vision_tower.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=True)


def vision_lora_b_grads(peft_model, processor):
    peft_model.train()
    peft_model(**batch(processor)).loss.backward()
    return [
        p.grad for n, p in peft_model.named_parameters() if "vision_tower" in n and "lora_B" in n and p.requires_grad
    ]


def test_the_silent_zero_gradient_trap_is_avoided(tokenizer_dir):
    from peft import get_peft_model

    model, processor = build_vlm(LlamaTokenizer.from_pretrained(tokenizer_dir))
    plain = get_peft_model(model, lora_config("vision"))
    reentrant_checkpointing_after_wrapping(plain)
    # the trap: pixel inputs carry no grad, so the reentrant checkpoint drops the graph to the LoRA weights
    assert all(g is None or g.abs().sum() == 0 for g in vision_lora_b_grads(plain, processor))

    model, processor = build_vlm(LlamaTokenizer.from_pretrained(tokenizer_dir))
    ours = apply_lora(model, "vision")
    reentrant_checkpointing_after_wrapping(ours)
    grads = vision_lora_b_grads(ours, processor)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
