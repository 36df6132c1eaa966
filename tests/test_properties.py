"""Each property calplug promises, written once and checked on every case of tests/cases.py (one
case per integration, modality and batch layout; a case whose upstream is not installed skips,
naming what would enable it).

* faithful mode equals the two-forward reference of the spec (loss, gaps, weights, gradients);
* with unit weights the CAL loss is the model's own loss, and a text-only sample weighs alpha;
* drop equals mask on every text row, and differs only where documented;
* the drop contrast pass covers only the text of samples that have an image;
* the contrast side never calls ``lm_head`` nor makes a vocabulary-sized tensor;
* disable restores the model exactly; eval, calls without labels and ``generate()`` are untouched.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import calplug
from calplug import contrast_pass
from _faithful import faithful_step_after_reference
from _recording import ShapeRecorder, record_calls
from cases import CASES, POOLED, SETTING, params
from _close import assert_grads_rel_close
from _hf_kinds import POSITIONS


# The skips of a property that does not apply (tests/support_matrix.py's NOT_APPLICABLE reads
# them: such a skip does not keep the family from "proven").
MASK_REFUSED = ("this decoder's conv / linear-attention layers do not honour mask holes, so calplug "
                "refuses contrast='mask' for it (tests/test_family_decoders.py checks the refusal); "
                "its faithful case uses drop")


def skip_where_mask_is_refused(case, contrast):
    if contrast == "mask" and case.contrast != "mask":
        pytest.skip(MASK_REFUSED)


NO_POSITIONS = ("the image is not at positions of the decoder sequence, so drop and mask are the "
                "same image-free pass (tests/test_kinds.py checks that they agree on every row)")


def skip_where_the_image_has_no_positions(case):
    if case.kind != POSITIONS:
        pytest.skip(f"{case.kind} models: {NO_POSITIONS}")


def gaps_with(model, batch, **config):
    with calplug.enabled(model, **config):
        return model(**batch).cal_gaps


# -- faithful mode -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", params(with_settings=True))
def test_faithful_mode_equals_reference(case, env):
    """Faithful mode equals the two-forward reference in loss, gaps, weights and every gradient,
    at each of the case's settings (its id lists them; every case has alpha 0 with pooling, where
    the weights vary, and the published alpha 1 with pooling, where flat pooling's edges decide
    the loss). One build and one pair of reference forwards serve every setting."""
    model, batch = case.build(env)
    first = case.reference(model, batch, *case.settings[0])
    if case.check is not None:
        case.check(model, batch, first)
    assert bool(first.with_image[0]) and (not case.text_only or not bool(first.with_image[2]))
    for i, setting in enumerate(case.settings):
        alpha, beta, window = setting
        last = i == len(case.settings) - 1
        if i == 0:
            ref = first
        elif first.forwards is not None:
            ref = first.at(alpha, beta, window)
        else:  # a reference that keeps no forwards: run it again on the plain model
            calplug.disable(model)
            ref = case.reference(model, batch, alpha, beta, window)
        out, cal_grads, ref_grads = faithful_step_after_reference(
            model, batch, ref.loss, alpha, beta, window, contrast=case.contrast,
            retain_graph=not last and first.forwards is not None)
        at = f"at alpha={alpha:g}, beta={beta:g}, window={window}"
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0, msg=lambda m: f"loss {at}: {m}")
        torch.testing.assert_close(out.cal_gaps.reshape(-1), ref.gaps, rtol=1e-5, atol=case.gap_atol,
                                   msg=lambda m: f"gaps {at}: {m}")
        torch.testing.assert_close(out.cal_weights.reshape(-1), ref.weights, rtol=1e-5,
                                   atol=case.gap_atol, msg=lambda m: f"weights {at}: {m}")
        for name in case.grad_names:
            assert any(name in n for n in cal_grads), name
        try:
            assert_grads_rel_close(cal_grads, ref_grads, 1e-5, atol=case.grad_atol)
        except AssertionError as error:
            raise AssertionError(f"gradients {at}: {error}") from None
        if case.text_only:
            assert torch.count_nonzero(out.cal_gaps[2]) == 0  # text-only sample: no gap
        if setting == SETTING:
            # alpha = 0: the weights vary, and the CAL loss is far from plain cross-entropy
            assert out.cal_weights.std() > case.min_weight_std
            if case.far_from_plain:
                logits = case.text_logits(model, out.logits)
                rows = logits[:, :-1] if case.label_shift else logits
                plain = F.cross_entropy(rows.flatten(0, 1).float(), ref.labels[:, case.label_shift:].flatten())
                assert (out.loss - plain).abs() > 1e-4 * plain  # 10x the tolerance
            assert out.cal_gaps[0].abs().max() > 0
    assert SETTING in case.settings and POOLED in case.settings


# -- unit weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", params())
def test_unit_weights_give_the_models_own_loss_and_text_only_samples_weigh_alpha(case, env):
    """alpha = beta = 1: every weight is 1, so the CAL loss is the model's own mean cross-entropy:
    labels, image positions and padding line up with what the model trains on."""
    model, batch = case.build(env)
    own = case.own_loss(model, batch)
    with calplug.enabled(model, contrast=case.contrast, alpha=1.0, beta=1.0):
        out = model(**batch)
    assert torch.all(out.cal_weights == 1.0)
    torch.testing.assert_close(out.loss, own, rtol=1e-6, atol=0)
    with calplug.enabled(model, contrast=case.contrast, alpha=0.0, beta=5.0, pool_window=1):
        out = model(**batch)
    # sample 2 is text-only: no gap, so every weight is alpha = 0
    if case.text_only:
        assert torch.all(out.cal_gaps[2] == 0) and torch.all(out.cal_weights[2] == 0.0)
    assert out.cal_weights[0].max() > 0


# -- drop = mask on text rows --------------------------------------------------------------------
@pytest.mark.parametrize("case", params())
def test_drop_equals_mask_on_text_rows(case, env):
    """The default contrast removes image positions (and padding) but keeps every text token's
    position: on text rows its gaps equal the published mask contrast's. It differs only on the
    rows docs/cal.md names (at removed positions), and there a visual row borrows the last text
    state before its image."""
    skip_where_mask_is_refused(case, "mask")
    skip_where_the_image_has_no_positions(case)
    model, batch = case.build(env)
    layout = case.layout(model, batch)
    with calplug.enabled(model, contrast="drop", alpha=0.0):
        out = model(**batch)
    drop, logits = out.cal_gaps, out.logits.detach()
    masked = gaps_with(model, batch, contrast="mask", alpha=0.0)
    rows = layout.text_rows
    assert int(rows.sum()) > 20
    torch.testing.assert_close(drop[rows], masked[rows], rtol=1e-4, atol=case.drop_atol)
    assert masked[rows].abs().max() > 1e-4
    assert float((drop - masked)[layout.removed_rows].abs().max()) > 1e-3
    assert torch.count_nonzero(drop[2]) == 0  # the text-only sample
    # Rows in an image's run of positions that predict an ignored token (target 0) all borrow the
    # same text state: main logit - gap is constant over them. An image before any text (BLIP-2's
    # processors write it before BOS) has no text state to borrow: those rows get no gap.
    for b in range(drop.shape[0]):
        visual = layout.visual[b, :-1]
        if not visual.any():
            continue
        start = int(visual.nonzero()[0])
        end = start + int(visual[start:].long().cumprod(0).sum())      # the first contiguous run
        run = torch.arange(start, end)
        run = run[layout.labels[b, run + 1] == -100]
        assert run.numel() > 1
        if not bool((layout.attention[b, :start].bool() & ~layout.visual[b, :start]).any()):
            assert torch.count_nonzero(drop[b, run]) == 0
            continue
        contrast = logits[b, run, 0].float() - drop[b, run]
        torch.testing.assert_close(contrast, contrast[:1].expand_as(contrast), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", params())
def test_drop_pass_covers_only_text_of_samples_with_images(case, env):
    model, batch = case.build(env)
    layout = case.layout(model, batch)
    kept = (layout.attention.bool() & ~layout.visual)
    with_image = layout.with_image
    with calplug.enabled(model, contrast="drop"), record_calls(case.decoder(model)) as calls:
        model(**batch)
    assert len(calls) == 2
    assert calls[0][:2] == tuple(layout.visual.shape)
    # only the samples with images, only their text tokens (no image positions, no padding
    # beyond the longest of them)
    assert calls[1][:2] == (int(with_image.sum()), int(kept[with_image].sum(1).max()))


@pytest.mark.parametrize("contrast", ["drop", "mask"])
@pytest.mark.parametrize("case", params())
def test_contrast_side_never_calls_lm_head_nor_makes_vocab_sized_tensors(case, contrast, env,
                                                                          monkeypatch):
    skip_where_mask_is_refused(case, contrast)
    model, batch = case.build(env)
    head = case.head(model)
    vocab = head.weight.shape[0]
    recorders = []
    original = contrast_pass.target_gaps

    def recorded(*args, **kwargs):
        rec = ShapeRecorder()
        recorders.append(rec)
        with rec:
            return original(*args, **kwargs)

    monkeypatch.setattr(contrast_pass, "target_gaps", recorded)
    with calplug.enabled(model, contrast=contrast), record_calls(head) as head_calls, \
            record_calls(case.decoder(model)) as decoder_calls:
        out = model(**batch)
    assert len(recorders) == 1 and len(recorders[0].shapes) > 50   # the decoder pass ran inside
    assert len(decoder_calls) == 2
    # main pass only (an encoder-decoder's decoder runs one position longer than its labels)
    B, L = out.logits.shape[:2]
    assert len(head_calls) == 1 and head_calls[0][:2] == (B, L + 1 - case.label_shift)
    vocab_sized = [(f, s) for f, s in recorders[0].shapes if vocab in s]
    assert vocab_sized == []


# -- disable, eval, generate -----------------------------------------------------------------------
@pytest.mark.parametrize("case", params())
def test_disable_restores_bit_identical_outputs_and_state_dict(case, env):
    model, batch = case.build(env)
    keys = list(model.state_dict())
    had_forward = "forward" in model.__dict__
    before = model(**batch)
    calplug.enable(model)
    assert calplug.is_enabled(model) and list(model.state_dict()) == keys
    assert hasattr(model(**batch), "cal_weights")
    calplug.disable(model)
    assert not calplug.is_enabled(model)
    assert ("forward" in model.__dict__) == had_forward
    after = model(**batch)
    before_loss = before[0] if isinstance(before, tuple) else before.loss
    after_loss = after[0] if isinstance(after, tuple) else after.loss
    assert torch.equal(after_loss, before_loss) and torch.equal(after.logits, before.logits)
    assert not hasattr(after, "cal_weights")
    calplug.disable(model)  # disabling twice is harmless
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("case", params())
def test_eval_and_calls_without_labels_return_what_the_original_returns(case, env):
    model, batch = case.build(env)
    no_labels = case.without_labels(model, batch)
    model.eval()
    before_eval = model(**batch)
    model.train()
    before_train = model(**no_labels)
    calplug.enable(model)
    model.eval()
    after_eval = model(**batch)
    model.train()
    after_train = model(**no_labels)
    for before, after in ((before_eval, after_eval), (before_train, after_train)):
        assert type(before) is type(after)
        assert torch.equal(before.logits, after.logits)
        assert (before.loss is None) == (after.loss is None)
        if before.loss is not None:
            assert torch.equal(before.loss, after.loss)
        assert not hasattr(after, "cal_weights")
    assert hasattr(model(**batch), "cal_weights")  # training mode with labels is where CAL acts


@pytest.mark.parametrize("case", params([c for c in CASES if c.generate_inputs is not None]))
def test_generate_is_unchanged(case, env):
    model, _ = case.build(env)
    model.eval()
    inputs = case.generate_inputs(model)
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    calplug.enable(model)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt = inputs["input_ids"].shape[1] if case.label_shift else 1  # a decoder starts from its start token
    assert out.shape[1] > prompt and torch.equal(out, ref)
