"""The self-check of the first training step (calplug/contrast_pass.py `check_head`): the model's
own logits at a few supervised rows must be what calplug's contrast side computes from the same
final hidden states (``hidden . W[y] + b``, then the declared logit transform). A forward that
transforms its logits after ``lm_head`` in a way nobody declared (transformers 5.25 did so to
AyaVision) is stopped with the class, the library version and the size of the difference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import calplug
from calplug import CALConfigError, UnsupportedModelError, contrast_pass
from calplug.step import STATE_ATTR
from calplug.testing import llava_batch, tiny_llava


def scaled_llava(scale: float):
    """calplug's tiny Llava whose forward multiplies its logits by ``scale`` after lm_head (and
    trains on the scaled logits), as a release adding an undeclared logit transform would."""
    from transformers import LlavaForConditionalGeneration

    class LogitScaledLlava(LlavaForConditionalGeneration):
        def forward(self, **kwargs):
            labels = kwargs.pop("labels", None)
            out = super().forward(**kwargs)
            out.logits = out.logits * scale
            if labels is not None:
                out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                           labels[:, 1:].flatten(), ignore_index=-100)
            return out

    plain = tiny_llava(seed=0)
    model = LogitScaledLlava(plain.config)
    model.load_state_dict(plain.state_dict())
    return model.train()


def test_a_model_that_scales_its_logits_in_its_forward_is_stopped_at_the_first_step():
    import transformers

    model = scaled_llava(1.5)
    batch = llava_batch(model)
    calplug.enable(model)
    with pytest.raises(UnsupportedModelError) as raised:
        model(**batch)
    message = str(raised.value)
    assert "calplug's self-check stopped LogitScaledLlava" in message
    assert f"transformers {transformers.__version__}" in message
    assert "FamilyFacts" in message and "check_logits=False" in message
    # the size of the difference: 0.5 x the logit, as measured by the check itself
    found = float(message.split("differ by up to ")[1].split(" ")[0])
    model_logit = float(message.split("the model's logit ")[1].split(",")[0])
    ours = float(message.split(", calplug's ")[1].split(";")[0])
    assert found == pytest.approx(abs(model_logit - ours), rel=1e-3)
    assert model_logit == pytest.approx(1.5 * ours, rel=1e-4) and found > 1e-3
    assert not model.__dict__[STATE_ATTR].logits_checked
    with pytest.raises(UnsupportedModelError):  # not marked checked: every step stops
        model(**batch)
    calplug.disable(model)
    print(message)  # quoted in the report (pytest -s)


def test_the_check_can_be_turned_off_and_then_the_gaps_mix_two_kinds_of_logit():
    model = scaled_llava(1.5)
    batch = llava_batch(model)
    with calplug.enabled(model, check_logits=False, alpha=0.0):
        out = model(**batch)
    assert torch.isfinite(out.loss) and out.cal_gaps.abs().max() > 0
    with pytest.raises(CALConfigError, match="check_logits must be True or False"):
        calplug.CALConfig(check_logits="yes")


def test_the_check_runs_once_per_enabled_model_and_passes_on_a_plain_model(monkeypatch):
    model = tiny_llava(seed=0).train()
    batch = llava_batch(model)
    seen = []
    original = contrast_pass.head_check

    def counted(*args, **kwargs):
        found = original(*args, **kwargs)
        seen.append(found)
        return found

    monkeypatch.setattr(contrast_pass, "head_check", counted)
    calplug.enable(model)
    for _ in range(3):
        model(**batch)
    assert len(seen) == 1 and seen[0].passed and seen[0].rows == 4
    assert seen[0].difference <= seen[0].tolerance < 1e-3
    assert model.__dict__[STATE_ATTR].logits_checked
    calplug.disable(model)
    calplug.enable(model)  # a new enable checks again
    model(**batch)
    assert len(seen) == 2


def test_a_batch_without_a_finite_row_defers_the_check_to_the_next_step():
    model = tiny_llava(seed=0).train()
    batch = llava_batch(model)
    bad = dict(batch, pixel_values=torch.full_like(batch["pixel_values"], float("nan")))
    calplug.enable(model)
    with pytest.warns(calplug.CALWarning):
        model(**bad)  # every row after the NaN image is NaN; the text-only sample has finite rows
    state = model.__dict__[STATE_ATTR]
    assert state.logits_checked  # sample 2 (text only) gave finite rows to compare
    calplug.disable(model)


def test_verify_reports_the_check_as_a_row():
    model = scaled_llava(1.5)
    report = calplug.verify(model, llava_batch(model), gradients=False)
    row = next(c for c in report.checks if c.name == "model logits = lm_head(hidden) + declared transform")
    assert not row.passed and row.measured > 1e-3
    assert "self-check stopped LogitScaledLlava" in row.note
    plain = tiny_llava(seed=0).train()
    report = calplug.verify(plain, llava_batch(plain), gradients=False)
    row = next(c for c in report.checks if c.name == "model logits = lm_head(hidden) + declared transform")
    assert row.passed and row.measured <= 1e-5
