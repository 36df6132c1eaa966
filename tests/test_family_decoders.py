"""What differs between the decoders and heads of the transformers families, beyond the properties
every case of tests/cases.py runs: built (4-D / per-layer-type) masks, sliding windows and
attention chunks, layers that ignore mask holes, logit soft-capping, inputs that only describe
image positions (Qwen3-VL's deepstack) and router load-balancing losses.

Tiny seeded models (tests/_hf_families.py), CPU, eager attention; a family the installed
transformers lacks skips, naming the version that has it.
"""
import warnings

import pytest
import torch

import calplug
from calplug import CALConfigError, CALInputError, UnsupportedModelError
from calplug.integrations import families, transformers_vlm
from _hf_families import FAMILIES, decoder_and_head, make_batch, tf_version, visual_positions
from _skips import skip_unrunnable_family
from _close import assert_grads_rel_close, grads


IMAGE_BATCH = ("image", "image", None)


def family_model(name, **build):
    family = FAMILIES[name]
    skip_unrunnable_family(family)
    return family, family.build(0, **build).train()


def decoder_calls(decoder):
    calls = []
    handle = decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(dict(kwargs)) and None, with_kwargs=True)
    return calls, handle


def text_rows(model, batch):
    visual = visual_positions(model, batch["input_ids"])
    return (batch["attention_mask"].bool() & ~visual)[:, :-1]


# -- layers that ignore mask holes: drop only --------------------------------------------------
DROP_ONLY = [n for n, f in FAMILIES.items() if f.drop_only]


@pytest.mark.parametrize("name", DROP_ONLY)
def test_mask_contrasts_refused_where_layers_ignore_mask_holes(name):
    """Lfm2-VL's short convolutions and Qwen3.5's Gated DeltaNet layers zero a masked position
    but still advance their state over it: the decoder with a holed mask is not the decoder
    without the image (text rows differ from the drop pass), so calplug refuses mask and
    patch_mask at enable, naming why, and runs drop."""
    family, model = family_model(name)
    for contrast in ("mask", "patch_mask"):
        with pytest.raises(UnsupportedModelError, match="do not honour holes in the attention mask"):
            calplug.enable(model, contrast=contrast)
        assert not calplug.is_enabled(model)
    calplug.enable(model)  # drop, the default
    with pytest.raises(UnsupportedModelError, match="contrast='drop' removes the image positions"):
        calplug.enable(model, contrast="mask")  # re-enabling with another contrast is checked too
    assert calplug.config_of(model).contrast == "drop"
    calplug.disable(model)
    # why: the holed mask is not "without the image" for these layers
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    decoder, head = decoder_and_head(model)
    calls, handle = decoder_calls(decoder)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    kw = {k: v for k, v in calls[0].items() if k not in ("past_key_values", "use_cache", "cache_position")}
    visual = visual_positions(model, batch["input_ids"])
    keep = batch["attention_mask"][0].bool() & ~visual[0]
    positions = kw.get("position_ids")
    L = batch["input_ids"].shape[1]
    positions = torch.arange(L).expand(1, L) if positions is None else positions
    with torch.no_grad():
        holed = decoder(**dict(kw, attention_mask=batch["attention_mask"] * (~visual).long()))[0][0, keep]
        removed = decoder(**dict(kw, inputs_embeds=kw["inputs_embeds"][:1, keep],
                                 attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                                 position_ids=positions[..., :1, keep]))[0][0]
    after = keep.nonzero().squeeze(1) > visual[0].nonzero().max()  # text after the image
    assert (holed[after] - removed[after]).abs().max() > 1e-3


# -- built 4-D / per-layer-type masks ----------------------------------------------------------
READY_MASKS = {"gemma3": dict, "gemma4": dict, "paligemma": torch.Tensor, "molmo2": torch.Tensor}


@pytest.mark.parametrize("name", list(READY_MASKS))
def test_built_masks_come_back_to_the_decoder_hidden_or_sliced(name):
    """Gemma 3 / 4 hand their decoder a dict of 4-D masks per layer type (bidirectional inside an
    image; sliding windows), PaliGemma a 4-D prefix-LM mask, Molmo2 a 4-D mask bidirectional over
    the image: the contrast pass gets masks of the same kind back (image key columns blocked for
    mask, rows and columns sliced to the kept positions for drop), and drop equals mask on text
    rows even with a sliding window shorter than the sequence (Gemma's tiny window is 4)."""
    family, model = family_model(name)
    batch = make_batch(family, model, kinds=IMAGE_BATCH, padding_side="left")
    decoder, _ = decoder_and_head(model)
    gaps = {}
    for contrast in ("mask", "drop"):
        with calplug.enabled(model, contrast=contrast, alpha=0.0):
            calls, handle = decoder_calls(decoder)
            gaps[contrast] = model(**batch).cal_gaps
            handle.remove()
        main_call, contrast_call = calls
        assert isinstance(main_call["attention_mask"], READY_MASKS[name])
        assert isinstance(contrast_call["attention_mask"], READY_MASKS[name])
        masks = contrast_call["attention_mask"]
        masks = masks.values() if isinstance(masks, dict) else [masks]
        L = contrast_call["inputs_embeds"].shape[1]
        assert all(m.shape[-2:] == (L, L) for m in masks if m is not None)
    rows = text_rows(model, batch)
    torch.testing.assert_close(gaps["drop"][rows], gaps["mask"][rows], rtol=1e-4, atol=1e-5)
    assert gaps["mask"][rows].abs().max() > 1e-4


def test_paligemma_prefix_text_keeps_its_bidirectional_attention():
    """PaliGemma's prompt is in the bidirectional prefix: a contrast that hid the image with a
    2-D mask (the decoder then builds a causal mask) would make the prompt causal and move the
    gaps of prompt rows; calplug's contrast keeps the model's own prefix mask."""
    family, model = family_model("paligemma")
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    decoder, head = decoder_and_head(model)
    with calplug.enabled(model, contrast="mask", alpha=0.0):
        out = model(**batch)
    calls, handle = decoder_calls(decoder)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    kw = {k: v for k, v in calls[0].items() if k not in ("past_key_values", "use_cache", "cache_position", "labels")}
    visual = visual_positions(model, batch["input_ids"])
    with torch.no_grad():
        causal = head(decoder(**dict(kw, attention_mask=batch["attention_mask"] * (~visual).long()))[0])
    targets = batch["labels"][:, 1:].clamp(min=0)
    causal_gaps = out.logits[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1) \
        - causal[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    prefix = (batch["token_type_ids"] == 0)[:, :-1] & text_rows(model, batch)
    prefix[2] = False  # the text-only sample has no gap
    assert (causal_gaps - out.cal_gaps)[prefix].abs().max() > 1e-4


def test_paligemma_before_5_gets_labels_for_its_training_mask():
    """Before 5.0 PaliGemma builds its prefix-LM mask only when given labels (without them the
    whole sequence attends bidirectionally: the answer is visible). calplug's main pass then hands
    the labels on, and the CAL loss replaces the model's own."""
    if tf_version() >= (5, 0):
        pytest.skip("PaliGemma builds its training mask from token_type_ids alone from 5.0")
    family, model = family_model("paligemma")
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    seen = []
    original = type(model).forward

    def recording(*args, **kwargs):
        seen.append(set(kwargs))
        return original(model, *args, **kwargs)

    model.forward = recording
    with torch.no_grad():
        without = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        own = model(**batch)
    assert not torch.allclose(without, own.logits)  # the mask depends on labels
    calplug.enable(model, alpha=1.0, beta=1.0)
    unit = model(**batch)
    assert "labels" in seen[-1]
    torch.testing.assert_close(unit.logits, own.logits)
    torch.testing.assert_close(unit.loss, own.loss, rtol=1e-6, atol=0)


# -- sliding windows / chunks counted in sequence indices on 2-D-mask decoders -----------------
LOCAL = {"aya_vision": dict(window=4), "cohere2_vision": dict(window=4), "llama4": dict(chunk=4)}


@pytest.mark.parametrize("name", list(LOCAL))
def test_drop_falls_back_to_mask_beyond_the_attention_window(name):
    """Decoders that build sliding-window / chunked masks from a 2-D mask count the window in
    sequence indices: removing image positions would bring earlier text into a window, so drop
    would not equal mask. On a micro-batch longer than the window calplug warns and runs the mask
    contrast (identical gaps); with a window longer than the sequence drop runs as usual."""
    family, model = family_model(name, **LOCAL[name])
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    decoder, _ = decoder_and_head(model)
    with calplug.enabled(model, contrast="mask", alpha=0.0):
        masked = model(**batch).cal_gaps
    with calplug.enabled(model, contrast="drop", alpha=0.0):
        calls, handle = decoder_calls(decoder)
        with pytest.warns(UserWarning, match="longer than the decoder's sliding window / attention chunk"):
            dropped = model(**batch).cal_gaps
        handle.remove()
    assert calls[1]["inputs_embeds"].shape == calls[0]["inputs_embeds"].shape  # the mask pass ran
    torch.testing.assert_close(dropped, masked, rtol=0, atol=0)
    family, wide = family_model(name)  # the case's window (64) is longer than the sequence
    with calplug.enabled(wide, contrast="drop"), warnings.catch_warnings():
        warnings.simplefilter("error")
        calls, handle = decoder_calls(decoder_and_head(wide)[0])
        wide(**make_batch(family, wide, kinds=IMAGE_BATCH))
        handle.remove()
    assert calls[1]["inputs_embeds"].shape[1] < calls[0]["inputs_embeds"].shape[1]


# -- logit soft-capping ----------------------------------------------------------------------
def test_soft_capped_logits_get_the_same_transform_on_the_contrast_side():
    """Gemma4 soft-caps its logits after lm_head (tanh(x / c) * c): the contrast side's target
    logit is capped the same way (faithful mode equals the reference, tests/test_properties.py);
    here: gaps computed without the cap on the contrast side would differ, and loss_chunk (which
    computes logits as lm_head(hidden)) is refused."""
    family, model = family_model("gemma4")
    model.config.get_text_config().final_logit_softcapping = 0.5  # small cap: a large effect
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    with calplug.enabled(model, contrast="mask", alpha=0.0):
        capped = model(**batch)
    assert capped.logits.abs().max() <= 0.5
    original = transformers_vlm.compat.logit_softcap
    try:
        transformers_vlm.compat.logit_softcap = lambda *args: None
        with calplug.enabled(model, contrast="mask", alpha=0.0):
            uncapped = model(**batch)
    finally:
        transformers_vlm.compat.logit_softcap = original
    assert (capped.cal_gaps - uncapped.cal_gaps).abs().max() > 1e-2
    with calplug.enabled(model, loss_chunk=4), pytest.raises(CALConfigError, match="soft-capping"):
        model(**batch)


def test_per_layer_masks_that_are_not_4d_are_refused_naming_the_kernel():
    """Flash-attention kernels take 2-D masks per layer type; the contrast edits 4-D ones."""
    from calplug.contrast import drop_contrast, mask_contrast
    from calplug.hookspecs import MainPass

    B, L = 1, 4
    visual = torch.tensor([[False, True, True, False]])
    main = MainPass(output=None, logits=torch.zeros(B, L, 8), labels=torch.zeros(B, L, dtype=torch.long),
                    decoder=None, lm_head=None, visual_mask=visual, attention_mask=torch.ones(B, L),
                    position_ids=torch.arange(L)[None],
                    decoder_kwargs={"inputs_embeds": torch.zeros(B, L, 2),
                                    "attention_mask": {"full_attention": torch.ones(B, L)}})
    for build in (mask_contrast, drop_contrast):
        with pytest.raises(CALInputError, match="attn_implementation='sdpa' or 'eager'"):
            build(main, None)


def test_a_matched_class_with_non_attention_layers_runs_drop_only(monkeypatch):
    """Without a FamilyFacts row (here: Lfm2-VL's row removed), the generic rule still reads the
    text layer types: layers that are not attention (short convolutions) refuse mask contrasts,
    and drop runs, after the one-time warning naming `calplug verify`."""
    family, model = family_model("lfm2_vl")
    monkeypatch.delitem(families.FAMILIES, family.class_name)
    calplug.errors._WARNED.discard(f"matched:{family.class_name}")
    with pytest.warns(UserWarning, match="calplug verify"):
        with pytest.raises(UnsupportedModelError, match="layers of type conv"):
            calplug.enable(model, contrast="mask")
    calplug.enable(model, contrast="drop")
    out = model(**make_batch(family, model, kinds=IMAGE_BATCH))
    assert calplug.is_enabled(model) and out.cal_gaps[0].abs().max() > 0


def test_qwen3_vl_visual_extras_cleared_by_drop_kept_by_mask():
    family, model = family_model("qwen3_vl")
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    decoder, _ = decoder_and_head(model)
    for contrast, kept in (("mask", True), ("drop", False)):
        calplug.enable(model, contrast=contrast)
        calls, handle = decoder_calls(decoder)
        model(**batch)
        handle.remove()
        main_call, contrast_call = calls
        assert main_call["visual_pos_masks"] is not None and main_call["deepstack_visual_embeds"] is not None
        if kept:
            assert contrast_call["visual_pos_masks"] is main_call["visual_pos_masks"]
            assert contrast_call["deepstack_visual_embeds"] is main_call["deepstack_visual_embeds"]
        else:
            assert contrast_call["visual_pos_masks"] is None
            assert contrast_call["deepstack_visual_embeds"] is None




# -- router load-balancing losses -----------------------------------------------------------------
# How each family asks for router logits: Qwen3-VL-MoE by the forward's argument, the others by
# their text config (the builder's ``router_logits``).
ROUTED = {"qwen3_vl_moe": "argument", "glm4v_moe": "config", "qwen3_5_moe": "config"}


@pytest.mark.parametrize("name", list(ROUTED))
def test_router_load_balancing_loss_is_kept(name):
    """With router logits on, the model's loss is LM loss + coef * aux_loss, added only when it
    is given labels; calplug's main pass runs without them, so the term is kept as
    MainPass.extra_loss: unit weights give the model's own loss and gradients, and with CAL
    weights (which differ from unit ones) the loss with router logits minus the loss without is
    exactly coef * aux_loss."""
    by_argument = ROUTED[name] == "argument"
    build = dict(router_aux_loss_coef=0.5) if by_argument else dict(router_logits=True)
    family, model = family_model(name, **build)
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    routed = dict(batch, output_router_logits=True) if by_argument else batch
    own = model(**routed)
    if not hasattr(own, "aux_loss"):
        pytest.skip(f"{family.class_name} in this release computes no router load-balancing loss "
                    "(its output has no aux_loss): there is nothing to keep")
    assert own.aux_loss is not None and own.aux_loss.item() > 0.1
    own.loss.backward()
    own_grads = grads(model)
    model.zero_grad(set_to_none=True)
    with calplug.enabled(model, alpha=1.0, beta=1.0):  # every weight 1: the model's own loss
        unit = model(**routed)
        unit.loss.backward()
        assert unit.loss.item() == pytest.approx(own.loss.item(), rel=1e-6)
        assert_grads_rel_close(grads(model), own_grads, 1e-5)
    model.zero_grad(set_to_none=True)
    text_config = model.config.get_text_config()
    with calplug.enabled(model):
        cal_routed = model(**routed)
        if by_argument:
            cal_plain = model(**batch)  # no router logits: no aux term
        else:
            text_config.output_router_logits = False
            cal_plain = model(**batch)
            text_config.output_router_logits = True
    assert cal_plain.loss.item() != pytest.approx(unit.loss.item(), rel=1e-3)  # CAL weights differ
    assert (cal_routed.loss - cal_plain.loss).item() == pytest.approx(0.5 * own.aux_loss.item(), rel=1e-5)
    with calplug.enabled(model), pytest.raises(CALInputError, match="return_dict=True"):
        model(**routed, return_dict=False)
