"""How calplug calls each transformers family's forward and what it reads back, beyond the
properties every case of tests/cases.py runs: the positions the decoder really used (M-RoPE),
the arguments the original forward must not get (num_items_in_batch) or calplug refuses (partial
logits), the version gates, and the pixel contrasts (blur, patch_mask) on every family.

Run by every env of the transformers matrix (tox.ini); a family the installed transformers does
not have is skipped with its name and the first version that has it. Tiny seeded random-init
models (tests/_hf_families.py), CPU, eager attention.
"""
import re

import pytest
import torch

import calplug
from calplug import CALInputError, UnsupportedModelError
from calplug.integrations import families
from _hf_families import FAMILIES, decoder_and_head, make_batch, tf_version, visual_positions
from _skips import skip_unrunnable_family
from _ablation_refs import blur_forwards, check_against, patch_mask_forwards


IMAGE_BATCH = ("image", "image", None)   # two image samples and a text-only one


VIDEO_BATCH = ("video", "image", None)   # a video sample, an image sample, a text-only one


def family_or_skip(name):
    family = FAMILIES[name]
    skip_unrunnable_family(family)
    return family


def video_works(name):
    return not (name == "llava_onevision" and (4, 49) <= tf_version() < (4, 50))


def skip_known_upstream_bug(name, kinds):
    if "video" in kinds and not video_works(name):
        pytest.skip("transformers 4.49's LlavaOnevision cannot take videos (its video check reads the "
                    "image mask: UnboundLocalError / false size mismatch); use 4.45 or >= 4.50")


def model_for(name, seed=0):
    family = family_or_skip(name)
    return family, family.build(seed).train()


def decoder_calls(decoder):
    calls = []
    handle = decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(dict(kwargs)) and None, with_kwargs=True)
    return calls, handle


QWEN = [n for n, f in FAMILIES.items() if f.qwen]


@pytest.mark.parametrize("kinds", [IMAGE_BATCH, VIDEO_BATCH], ids=["image", "video"])
@pytest.mark.parametrize("name", QWEN)
def test_qwen_drop_keeps_original_mrope_positions(name, kinds):
    """Recomputing positions for the shortened sequence changes the gaps; calplug's drop pass
    reuses the main pass's (3-D) positions and equals the mask pass on every text row."""
    family, model = model_for(name)
    batch = make_batch(family, model, kinds=kinds, padding_side="left")
    decoder, head = decoder_and_head(model)
    visual = visual_positions(model, batch["input_ids"])
    keep = batch["attention_mask"].bool() & ~visual

    calplug.enable(model, contrast="mask", alpha=0.0, beta=5.0, pool_window=1)
    masked = model(**batch)
    calplug.enable(model, contrast="drop")
    calls, handle = decoder_calls(decoder)
    dropped = model(**batch)
    handle.remove()
    main_call, contrast_call = calls
    main_pos = main_call["position_ids"]
    if main_pos is None:  # 4.45-4.46 training forwards: the decoder uses 0..L-1 on every axis
        L = batch["input_ids"].shape[1]
        main_pos = torch.arange(L).view(1, 1, L).expand(3, *batch["input_ids"].shape)

    # 1. each kept token of each image sample has exactly its main-pass position in the drop pass
    n_kept = keep[0].sum()
    assert contrast_call["inputs_embeds"].shape[0] == 2  # the text-only sample is not re-run
    for row, b in enumerate((0, 1)):
        n = int(keep[b].sum())
        torch.testing.assert_close(contrast_call["position_ids"][..., row, :n], main_pos[..., b, keep[b]],
                                   rtol=0, atol=0)
    # 2. the gaps of text rows (kept position predicting the next token) equal the mask pass's
    rows = keep[:, :-1]
    torch.testing.assert_close(dropped.cal_gaps[rows], masked.cal_gaps[rows], rtol=1e-4, atol=1e-5)
    # 3. ... while positions recomputed for the shortened sample 0 change them
    with torch.no_grad():
        short = main_call["inputs_embeds"][0, keep[0]].unsqueeze(0)
        extra = {"attention_mask": torch.ones(short.shape[:2], dtype=torch.long)}
        if "visual_pos_masks" in main_call:
            extra.update(visual_pos_masks=None, deepstack_visual_embeds=None)
        recomputed = decoder(inputs_embeds=short, position_ids=None, use_cache=False, **extra)[0]
        kept_pos = main_pos[..., 0, keep[0]].unsqueeze(-2)
        reused = decoder(inputs_embeds=short, position_ids=kept_pos, use_cache=False, **extra)[0]
    targets = batch["labels"][0, 1:].clamp(min=0)[keep[0, :-1]]  # the spec's target: label, or 0 if ignored
    if keep[0, -1]:
        recomputed, reused = recomputed[:, :-1], reused[:, :-1]
    logit = lambda h: head(h)[0].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    masked_wo = masked.logits[0, :-1][keep[0, :-1]].gather(-1, targets.unsqueeze(-1)).squeeze(-1) \
        - masked.cal_gaps[0][keep[0, :-1]]
    torch.testing.assert_close(logit(reused), masked_wo, rtol=1e-4, atol=1e-5)
    # random-init attention is nearly uniform, so the effect is small, but 10x the tolerance above
    assert (logit(recomputed) - masked_wo).abs().max() > 1e-4, "recomputed positions should differ"
    assert n_kept < batch["attention_mask"][0].sum()


@pytest.mark.parametrize("name", QWEN)
def test_qwen_without_mm_token_type_ids_warns(name):
    import inspect

    family, model = model_for(name)
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        pytest.skip(f"{family.class_name} takes no mm_token_type_ids before transformers 5.3")
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    del batch["mm_token_type_ids"]
    calplug.enable(model)
    with pytest.warns(UserWarning, match="without mm_token_type_ids"):
        try:
            model(**batch)
        except ValueError as error:  # Qwen2-VL / Qwen3-VL 5.4+ refuse; Qwen2.5-VL goes 1-D
            assert "mm_token_type_ids" in str(error)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_original_forward_never_gets_num_items_in_batch(name):
    """The engine takes num_items_in_batch for its own loss; old forwards (Llava 4.45, Qwen2-VL
    <= 4.52) raise TypeError when given it."""
    family, model = model_for(name)
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    seen = []

    def recording_forward(*args, **kwargs):
        seen.append(set(kwargs))
        return type(model).forward(model, *args, **kwargs)

    model.forward = recording_forward
    calplug.enable(model, contrast="drop" if family.drop_only else "mask", alpha=0.0)
    plain = model(**batch).loss
    n = int((batch["labels"][:, 1:] != -100).sum())
    scaled = model(**batch, num_items_in_batch=2 * n).loss
    if name == "paligemma" and tf_version() < (5, 0):
        # PaliGemma before 5.0 builds its training mask from labels: calplug hands them on
        # (tests/test_family_decoders.py::test_paligemma_before_5_gets_labels_for_its_training_mask)
        seen = [keys - {"labels"} for keys in seen]
    assert all("num_items_in_batch" not in keys and "labels" not in keys for keys in seen)
    torch.testing.assert_close(scaled, plain / 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unsupported_version_names_supported_ones(name, monkeypatch):
    from calplug.integrations import compat

    _, model = model_for(name)
    since = families.FAMILIES[FAMILIES[name].class_name].since  # the class's first release
    oldest = f"{since[0]}.{since[1]}"
    monkeypatch.setattr(compat, "transformers_version", lambda: (4, 40))
    newest = re.escape(compat.TESTED_VERSIONS[-1])
    expected = rf"supports transformers >= {oldest}, < 6\.0 \(tested: .*{newest}\); installed: 4\.40"
    with pytest.raises(UnsupportedModelError, match=expected):
        calplug.enable(model)
    assert not calplug.is_enabled(model)
    monkeypatch.setattr(compat, "transformers_version", lambda: (6, 1))
    with pytest.raises(UnsupportedModelError, match="installed: 6.1"):
        calplug.enable(model)


@pytest.mark.parametrize("name", QWEN)
def test_unsupported_class_lists_families(name):
    _, model = model_for(name)
    listed = (r"Supported model classes: .*LlavaNextForConditionalGeneration.*"
              r"LlavaOnevisionForConditionalGeneration.*Qwen2VLForConditionalGeneration.*"
              r"Qwen2_5_VLForConditionalGeneration.*Qwen3VLForConditionalGeneration")
    with pytest.raises(UnsupportedModelError, match=listed):
        calplug.enable(model.model)  # the headless model: no logits, nothing to weight


@pytest.mark.parametrize("name", list(FAMILIES))
def test_partial_logits_refused(name):
    import inspect

    family, model = model_for(name)
    params = inspect.signature(model.forward).parameters
    arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in params), None)
    if arg is None:
        pytest.skip(f"{family.class_name} in this transformers version takes no logits_to_keep")
    batch = make_batch(family, model, kinds=IMAGE_BATCH)
    calplug.enable(model)
    with pytest.raises(CALInputError, match=f"{arg}=1: calplug needs the logits of every position"):
        model(**batch, **{arg: 1})


@pytest.mark.parametrize("name", list(FAMILIES))
def test_blur_contrast_where_pixels_are_images(name):
    """Llava types take images as [..., 3, H, W]: the blur contrast equals the model's own whole
    forward on blurred pixels (`calplug.reference.reference_blur`; loss, gaps, weights at alpha
    0). Qwen-VL pixels are pre-cut patches: blur is refused at enable, naming the alternatives."""
    family, model = model_for(name)
    if not family.images:
        with pytest.raises(UnsupportedModelError, match="contrast='blur' transforms the input pixels"):
            calplug.enable(model, contrast="blur")
        return
    kinds = family.video_kinds if family.video and video_works(name) else IMAGE_BATCH
    batch = make_batch(family, model, kinds=kinds)
    keys = [k for k in batch if "pixel_values" in k]  # DeepSeek-VL hybrid: high_res_pixel_values too
    forwards = blur_forwards(model, batch, 10.0, keys)
    blurred = check_against(model, batch, forwards, (0.0, 5.0, 3), gradients=False, gap_atol=1e-5,
                            contrast="blur", blur_sigma=10.0)
    assert torch.isfinite(blurred).all() and torch.all(blurred[2] == 0)
    assert blurred[0].abs().max() > 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_patch_mask_ratio_zero_is_no_contrast_one_is_mask_and_half_masks_the_seeded_half(name):
    """Tables 8/9 on every family: hiding no image position contrasts nothing (all gaps 0);
    hiding all of them is the published mask contrast; hiding half is the two-forward mask
    reference over the half docs/ablations.md's seeded rule picks (loss, gaps, weights)."""
    family, model = model_for(name)
    if family.drop_only:
        pytest.skip("mask contrasts are refused for this decoder (layers that ignore mask holes; "
                    "tests/test_family_decoders.py checks the refusal)")
    kinds = family.video_kinds if family.video and video_works(name) else IMAGE_BATCH
    batch = make_batch(family, model, kinds=kinds)
    calplug.enable(model, contrast="mask", alpha=0.0, pool_window=1)
    masked = model(**batch).cal_gaps
    calplug.enable(model, contrast="patch_mask", mask_ratio=0.0)
    assert torch.all(model(**batch).cal_gaps == 0)
    calplug.enable(model, contrast="patch_mask", mask_ratio=1.0)
    torch.testing.assert_close(model(**batch).cal_gaps, masked)
    calplug.disable(model)
    visual = visual_positions(model, batch["input_ids"])
    positions = family.positions(model, batch) if family.positions else None
    forwards = patch_mask_forwards(model, batch, visual, 0.5, 0, decoder_and_head(model)[0], positions)
    half = check_against(model, batch, forwards, (0.0, 5.0, 3), gradients=False, gap_atol=1e-5,
                         contrast="patch_mask", mask_ratio=0.5, seed=0)
    assert half.abs().max() > 0 and not torch.allclose(half, masked)
