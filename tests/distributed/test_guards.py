"""Refusals that protect training at scale from silently running without CAL."""
from __future__ import annotations

import pytest

import calplug
from calplug.errors import CALConfigError
from calplug.testing import llava_batch, tiny_llava


def test_fused_lm_head_training_call_is_refused_with_the_fix():
    """TRL's SFTTrainer calls ``model(..., fused_lm_head=True)`` and takes its own loss from
    log-probs: CAL would be silently skipped, so calplug refuses and names the fix."""
    model = tiny_llava(0).train()
    batch = llava_batch(model)
    with calplug.enabled(model):
        with pytest.raises(CALConfigError, match=r"enable_for_trainer\(trainer\)"):
            model(**batch, fused_lm_head=True)
        model.eval()
        # Outside training calplug does not intervene: the original forward gets the call as is.
        out = model(**batch, fused_lm_head=True)
        assert not hasattr(out, "cal_weights") and out.logits.shape[:2] == batch["input_ids"].shape
