"""Pre-merged ``inputs_embeds``: a caller that splices the images into the embeddings itself and
drops ``input_ids`` (ms-swift's Qwen-VL templates do, in a forward pre-hook) gives the visual
positions as ``mm_token_type_ids`` or as an adapter's explicit mask, and CAL then computes what it
computes from ``input_ids`` (`calplug.integrations.compat.visual_positions`)."""
from __future__ import annotations

import functools

import pytest
import torch

import calplug
from calplug.errors import CALInputError
from calplug.hookspecs import VISUAL_MASK_ARGUMENT
from calplug.integrations.capture import capture_decoder_call

import _hf_families as fam


def build(name):
    family = fam.FAMILIES[name]
    model = family.build(seed=0)
    batch = fam.make_batch(family, model, kinds=("image", None, "image"))
    return model, batch


def premerged(model, batch) -> dict:
    """The call ms-swift's pre-forward hook hands the model: the embeddings the model's own forward
    merged, the positions it computed, and no input_ids or pixels."""
    decoder, _ = fam.decoder_and_head(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), capture_decoder_call(decoder) as seen:
        model(**inputs)
    call = dict(inputs_embeds=seen["inputs_embeds"].detach(), attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    if seen.get("position_ids") is not None:
        call["position_ids"] = seen["position_ids"]
    return call


def cal_output(model, call):
    torch.manual_seed(0)
    return model(**call)


def recording(model):
    """Install a forward that records the keyword arguments the model itself receives."""
    seen = []
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        seen.append(set(kwargs))
        return inner(*args, **kwargs)

    model.forward = forward
    return seen


def assert_same_cal(a, b):
    torch.testing.assert_close(b.cal_gaps, a.cal_gaps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.cal_weights, a.cal_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)


def test_qwen_premerged_embeds_with_mm_token_type_ids_equal_the_input_ids_path():
    model, batch = build("qwen2_vl")
    if "mm_token_type_ids" not in batch:
        pytest.skip("this transformers release's Qwen2-VL forward takes no mm_token_type_ids (< 5.3)")
    calplug.enable(model.train(), alpha=0.0)
    via_ids = cal_output(model, batch)  # calplug itself, on input_ids
    call = premerged(model, batch)
    call["mm_token_type_ids"] = batch["mm_token_type_ids"]
    out = cal_output(model, call)
    assert bool((via_ids.cal_gaps != 0).any())  # the images really changed something
    assert_same_cal(via_ids, out)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_premerged_embeds_with_the_adapter_mask_equal_the_input_ids_path(name):
    model, batch = build(name)
    seen = recording(model)
    calplug.enable(model.train(), alpha=0.0)
    via_ids = cal_output(model, batch)  # calplug itself, on input_ids
    call = premerged(model, batch)
    call[VISUAL_MASK_ARGUMENT] = fam.visual_positions(model, batch["input_ids"])
    out = cal_output(model, call)
    assert_same_cal(via_ids, out)
    # The adapter's key never reaches the model, in training or passed through (eval).
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in call.items() if k != "labels"})
    assert seen and all(VISUAL_MASK_ARGUMENT not in kwargs for kwargs in seen)


def test_premerged_embeds_without_visual_positions_are_refused():
    model, batch = build("qwen2_vl")
    calplug.enable(model.train())
    with pytest.raises(CALInputError, match="mm_token_type_ids .* or calplug_visual_mask"):
        model(**premerged(model, batch))


def test_a_visual_mask_of_the_wrong_shape_is_refused():
    model, batch = build("qwen2_vl")
    calplug.enable(model.train())
    call = premerged(model, batch)
    call[VISUAL_MASK_ARGUMENT] = torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(CALInputError, match=r"visual-position mask has shape \(1, 3\)"):
        model(**call)
