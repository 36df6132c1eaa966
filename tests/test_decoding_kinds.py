"""Contrastive decoding on the kinds whose image is not spliced at placeholder ids of the text
decoder's sequence (tests/_hf_kinds.py: cross-attention, encoder-decoder, Kosmos): calplug's
decoding builds its image-blind branch by leaving image positions out of one decoder sequence,
so it refuses them before ``generate`` runs, with an `UnsupportedModelError` that names the class, why,
and what works instead (docs/decoding.md); the model is left as it was and plain ``generate``
gives the tokens it gave before. Where an integration does not declare the refusal
(`Integration.decoding_refusal`), the two ways these models' ``generate()`` departs from the
model's forward still end in an error naming the class, not a failure deep inside the loop.
"""
from __future__ import annotations

import pytest
import torch

import calplug
from calplug import CALInputError, UnsupportedModelError
from calplug.scoring import resolved
from _recording import record_calls
from _hf_kinds import CROSS, KINDS, PREFIX, SEQ2SEQ

NEW = 2
WHY = {  # kind or class -> what the refusal says is in the way
    CROSS: "only through cross-attention layers",
    SEQ2SEQ: "the image enters its encoder",
    PREFIX: "prepends the image inside the model",
    "Kosmos2ForConditionalGeneration": "hands the prompt to its text model's own generate()",
    "Kosmos2_5ForConditionalGeneration": "not built for it yet",
}


def built(name):
    family = KINDS[name]
    reason = family.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    model = family.build(0).eval()
    inputs = family.batch(model, "left", False)
    inputs.pop("labels")
    return family, model, inputs


def plain(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("name", list(KINDS))
def test_contrastive_decoding_refuses_the_kind_before_generate_runs(name):
    family, model, inputs = built(name)
    before = plain(model, inputs)
    cls = type(model).__name__
    why = WHY.get(cls, WHY.get(family.kind))
    with record_calls(family.vision(model)) as vision, record_calls(family.decoder(model)) as decoder:
        with pytest.raises(UnsupportedModelError) as refused:
            calplug.contrastive_generate(model, max_new_tokens=NEW, **inputs)
        message = str(refused.value)
        assert f"does not support {cls}: " in message and why in message
        assert f"Plain {cls}.generate() works" in message and "calplug.token_gaps" in message
        with pytest.raises(UnsupportedModelError, match=f"does not support {cls}: "):
            with calplug.contrastive_decoding(model, max_new_tokens=NEW):
                pass
    assert vision == [] and decoder == []  # refused before any forward
    assert "forward" not in model.__dict__
    torch.testing.assert_close(plain(model, inputs), before, rtol=0, atol=0)


@pytest.mark.parametrize("name, error, says", [
    ("blip_2_t5", UnsupportedModelError, "does not support Blip2ForConditionalGeneration (transformers "),
    ("kosmos2", UnsupportedModelError, "does not support Kosmos2ForConditionalGeneration (transformers "),
    ("udop", UnsupportedModelError, "does not support UdopForConditionalGeneration: generate() ran its encoder first"),
])
def test_an_undeclared_refusal_still_names_the_class(name, error, says, monkeypatch):
    """Without `Integration.decoding_refusal`: a ``generate()`` that hands the prompt to an inner
    model's ``generate()`` (BLIP-2, Kosmos-2), or that runs an encoder first (UDOP)."""
    _, model, inputs = built(name)
    monkeypatch.setattr(resolved(model)[2], "decoding_refusal", None)
    with pytest.raises(error) as failed:
        calplug.contrastive_generate(model, max_new_tokens=NEW, **inputs)
    assert says in str(failed.value)
    if name != "udop":
        assert "its generate() never called its own forward" in str(failed.value)
    assert "forward" not in model.__dict__


def test_a_processor_used_outside_its_block_is_an_input_error(monkeypatch):
    """Outside its ``with`` block the processor cannot be the model's: a `CALInputError` saying how
    to use it, not the refusal a model gets whose generate() never calls its forward."""
    _, model, inputs = built("kosmos2")
    monkeypatch.setattr(resolved(model)[2], "decoding_refusal", None)
    with calplug.contrastive_decoding(model) as processor:
        pass
    ids = inputs["input_ids"]
    with pytest.raises(CALInputError, match="inside its `with calplug.contrastive_decoding"):
        processor(ids, torch.zeros(ids.shape[0], 8))
