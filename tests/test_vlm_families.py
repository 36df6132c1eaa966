"""What is particular to the families of the generic placeholder-token integration
(integrations/transformers_vlm.py, integrations/families.py), beyond the properties every case of
tests/cases.py runs: masks that are not 2-D, sliding windows, layers that ignore mask holes,
logit soft-capping, router losses, refusals, and the support status the verify command and the
support matrix read.

Tiny seeded models (tests/_hf_families.py), CPU, eager attention; a family the installed
transformers lacks skips, naming the version that has it.
"""
import warnings

import pytest
import torch

import calplug
from calplug import CALConfigError, CALInputError, UnsupportedModelError
from calplug.integrations import families, transformers_vlm
from _hf_families import (FAMILIES, build_blip_2, build_deepseek_vl, build_fuyu, decoder_and_head,
                          make_batch, tf_version, visual_positions)
from _close import assert_grads_rel_close, grads

IMAGE_BATCH = ("image", "image", None)


def family_model(name, **build):
    family = FAMILIES[name]
    reason = family.skip_reason()
    if reason is not None:
        pytest.skip(reason)
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


# -- MoE router losses ----------------------------------------------------------------------
ROUTED = ["glm4v_moe", "qwen3_5_moe"]


@pytest.mark.parametrize("name", ROUTED)
def test_router_load_balancing_loss_is_kept(name):
    """With router logits on, the model's loss is LM loss + coef * aux_loss, added only when it
    is given labels; calplug's main pass runs without them, so the term is kept as
    MainPass.extra_loss: unit weights give the model's own loss and gradients, and with CAL
    weights the loss with router logits minus the loss without is exactly coef * aux_loss."""
    family, model = family_model(name, router_logits=True)
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    own = model(**batch)
    if not hasattr(own, "aux_loss"):
        pytest.skip(f"{family.class_name} in this release computes no router load-balancing loss "
                    "(its output has no aux_loss): there is nothing to keep")
    assert own.aux_loss is not None and own.aux_loss.item() > 0.1
    own.loss.backward()
    own_grads = grads(model)
    model.zero_grad(set_to_none=True)
    with calplug.enabled(model, alpha=1.0, beta=1.0):
        unit = model(**batch)
        unit.loss.backward()
        assert unit.loss.item() == pytest.approx(own.loss.item(), rel=1e-6)
        assert_grads_rel_close(grads(model), own_grads, 1e-5)
    model.zero_grad(set_to_none=True)
    with calplug.enabled(model):
        routed = model(**batch)
        model.config.get_text_config().output_router_logits = False
        plain = model(**batch)
    assert (routed.loss - plain.loss).item() == pytest.approx(0.5 * own.aux_loss.item(), rel=1e-5)
    model.config.get_text_config().output_router_logits = True
    with calplug.enabled(model), pytest.raises(CALInputError, match="return_dict=True"):
        model(**batch, return_dict=False)


# -- refusals, matched classes, broken releases -------------------------------------------------
REFUSED_BUILDERS = {"FuyuForCausalLM": (build_fuyu, (4, 45)),
                    "Blip2ForConditionalGeneration": (build_blip_2, (4, 45))}


@pytest.mark.parametrize("class_name", list(REFUSED_BUILDERS))
def test_refused_classes_name_why_at_enable(class_name):
    build, since = REFUSED_BUILDERS[class_name]
    if tf_version() < since:
        pytest.skip(f"{class_name} needs transformers >= {since[0]}.{since[1]}")
    try:
        model = build(0)
    except (TypeError, ValueError) as error:  # an older release's config takes other arguments
        pytest.skip(f"the tiny {class_name} config does not build on this release: {error}")
    reason = families.REFUSED[class_name]
    with pytest.raises(UnsupportedModelError, match="calplug does not support") as raised:
        calplug.enable(model)
    assert reason in str(raised.value)
    assert not calplug.is_enabled(model)
    assert families.support_status(class_name) == ("refused", reason)


@pytest.mark.parametrize("class_name", ["MllamaForConditionalGeneration", "ChameleonForConditionalGeneration",
                                        "Emu3ForConditionalGeneration", "Florence2ForConditionalGeneration",
                                        "JanusForConditionalGeneration"])
def test_refusal_table_names_the_reason(class_name):
    status, reason = families.support_status(class_name)
    assert status == "refused"
    assert any(word in reason for word in ("cross-attention", "VQ", "encoder-decoder"))


def test_matched_class_is_accepted_once_warned_and_runs():
    """DeepseekVL has no FamilyFacts row: the generic rule accepts it (image placeholders at
    image_token_id) with one warning per class naming `calplug verify`, and the CAL step runs."""
    if tf_version() < (4, 54):
        pytest.skip("DeepseekVLForConditionalGeneration needs transformers >= 4.54")
    model = build_deepseek_vl(0).train()
    calplug.errors._WARNED.discard(f"matched:{type(model).__name__}")
    with pytest.warns(UserWarning, match="calplug verify"):
        calplug.enable(model)
    calplug.disable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calplug.enable(model)  # once per class
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 240, (2,), generator=g), torch.full((16,), 250),
                     torch.randint(3, 240, (8,), generator=g)]).unsqueeze(0)
    labels = ids.clone()
    labels[:, :20] = -100
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                pixel_values=torch.randn(1, 3, 32, 32, generator=g))
    assert torch.isfinite(out.loss) and out.cal_gaps.abs().max() > 0
    status, reason = families.support_status("DeepseekVLForConditionalGeneration")
    assert status == "matched" and "calplug verify" in reason


def test_llama4_on_a_broken_release_is_refused_with_the_upstream_bug():
    if tf_version() < (4, 51):
        pytest.skip("Llama4ForConditionalGeneration needs transformers >= 4.51")
    import transformers

    model = FAMILIES["llama4"].build(0)
    if transformers.__version__ == "5.24.0":
        with pytest.raises(UnsupportedModelError, match="image_outputs"):
            calplug.enable(model)
    else:
        calplug.enable(model)
        assert calplug.is_enabled(model)


# -- the table, the tests and support_status agree ----------------------------------------------
def test_every_proven_family_has_cases_and_every_family_case_a_row():
    from cases import CASES

    keys = {c.id.split("-")[1] for c in CASES if c.id.startswith("hf-")}
    rows = {f.key: f for f in families.FAMILIES.values()}
    proven = {k for k, f in rows.items() if f.proven}
    assert proven <= keys, proven - keys
    for key in keys:
        assert FAMILIES[key].class_name == rows[key].class_name
        if key not in proven:  # cases that cannot run in the tox matrix (timm): matched, not proven
            assert FAMILIES[key].unavailable is not None and rows[key].unproven_reason
    for facts in families.FAMILIES.values():
        status, reason = families.support_status(facts.class_name)
        assert status == ("proven" if facts.proven else "matched"), facts.class_name
        assert reason
    assert not families.FAMILIES.keys() & families.REFUSED.keys()


def test_support_status_of_every_image_text_to_text_class():
    """Every class of the installed transformers' image-text-to-text mapping gets a status and a
    reason; the placeholder-token families of the table are proven."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError:
        pytest.skip("this transformers has no image-text-to-text mapping")
    seen = {}
    for class_name in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()):
        status, reason = families.support_status(class_name)
        assert status in ("proven", "refused", "matched") and reason, class_name
        seen[class_name] = status
    proven = [c for c, s in seen.items() if s == "proven"]
    assert "LlavaForConditionalGeneration" in proven
    if tf_version() >= (5, 0):
        assert len(proven) >= 20, proven


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
