"""calplug on LLaVA-style codebases (tiny seeded models built from configs, CPU): what is
particular to their splice. The properties every integration shares run on these codebases' cases
in tests/test_properties.py.

haotian-liu LLaVA (llava-torch==1.2.2.post1, tox -e llava), LLaVA-VL LLaVA-NeXT
($CALPLUG_LLAVA_NEXT_SRC, tox -e llava-next) and MGM ($CALPLUG_MGM_SRC, tox -e mgm). Each test
skips with a message naming what is missing when its codebase is not importable.
"""
import pytest
import torch

import calplug
from calplug import CALInputError
from _faithful import faithful_step_after_reference
from cases import LLAVA_STYLE, POOLED, SETTING, llava_style_reference
from _ablation_refs import blur_forwards, check_against
from _close import assert_grads_rel_close

import _llava_style_models as tiny

CASES = LLAVA_STYLE
IDS = ["-".join(c) for c in CASES]
# One case per codebase (and both LLaVA variants) for the behaviour tests.
FEW = [CASES[0], CASES[1], CASES[4], CASES[6], CASES[7]]
FEW_IDS = ["-".join(c) for c in FEW]


def make(case, env, **overrides):
    name, variant, backbone = case
    tiny.codebase(name)
    return tiny.build(name, env.clip_folder(), variant=variant, backbone=backbone, **overrides)


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_disable_restores_and_the_splice_is_never_left_patched(case, env):
    model = make(case, env)
    batch = tiny.batch(model, variant=case[1])
    plain = model(**batch).loss
    calplug.enable(model)
    cal = model(**batch)
    assert "prepare_inputs_labels_for_multimodal" not in model.__dict__
    with pytest.raises(CALInputError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 64), labels=torch.zeros(1, 3, dtype=torch.long))
    assert "prepare_inputs_labels_for_multimodal" not in model.__dict__
    with pytest.raises(Exception):  # fails inside the upstream's vision tower, mid-splice
        model(**dict(batch, images=torch.zeros(2, 5, 7)))
    assert "prepare_inputs_labels_for_multimodal" not in model.__dict__
    tuple_out = model(**batch, return_dict=False)  # the upstream's tuple form, loss first
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], cal.loss)
    calplug.disable(model)
    assert "forward" not in model.__dict__ and not calplug.is_enabled(model)
    assert torch.equal(model(**batch).loss, plain)
    assert hasattr(cal, "cal_weights")


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_bad_labels_are_refused_with_the_fix(case, env):
    model = make(case, env)
    batch = tiny.batch(model, variant=case[1])
    calplug.enable(model)
    with pytest.raises(CALInputError, match="do not match input_ids"):
        model(**dict(batch, labels=batch["labels"][:, 1:]))


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_no_images_in_the_batch(case, env):
    """images=None: the splice returns input_ids; every gap is 0 and the loss is plain CE."""
    model = make(case, env)
    batch = tiny.batch(model, samples=((3, 0, 6), (5, 0, 4)))
    batch.pop("images")
    plain = model(**batch).loss
    calplug.enable(model, contrast="mask")
    out = model(**batch)
    assert torch.count_nonzero(out.cal_gaps) == 0
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_upstream_computes_no_cross_entropy_of_its_own(case, env, monkeypatch):
    """The rest of the forward gets labels=None: no cross-entropy over all B * (L - 1) rows
    besides calplug's own over the supervised rows (every path here ends in F.cross_entropy)."""
    model = make(case, env)
    batch = tiny.batch(model, variant=case[1])
    rows = []
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda input, *a, **k: rows.append(input.reshape(-1, input.shape[-1]).shape[0])
                        or original(input, *a, **k))
    plain = model(**batch)
    B, L = plain.logits.shape[:2]
    assert max(rows) >= B * (L - 1)  # the upstream's own loss when not patched (transformers 5: B * L)
    rows.clear()
    calplug.enable(model)
    out = model(**batch)
    supervised = int((tiny.splice(model, batch)[3][:, 1:] != -100).sum())
    assert rows == [supervised] and supervised < B * (L - 1) and out.loss.requires_grad


def _decoder_positions(model, batch, **config):
    calls = []
    decoder = model.get_model()
    handle = decoder.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw.get("position_ids"), kw["inputs_embeds"].shape[1])),
        with_kwargs=True)
    try:
        with calplug.enabled(model, **config):
            model(**batch)
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "llava-next"],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] == "llava-next"])
def test_pos_skipping_positions_are_reused_not_recomputed(case, env):
    """LLaVA-NeXT's use_pos_skipping shifts positions at random inside the splice: the contrast
    pass must get the positions the main pass used."""
    model = make(case, env, use_pos_skipping=True, pos_skipping_range=1000)
    batch = tiny.batch(model, variant=case[1])
    (main_pos, L), (contrast_pos, _) = _decoder_positions(model, batch, contrast="mask")
    assert main_pos is not None and not torch.equal(main_pos[0], torch.arange(L))
    assert torch.equal(contrast_pos.expand(main_pos.shape[0] if main_pos.dim() > 1 else 1, L)[0], main_pos[0])
    (main_pos, L), (drop_pos, L_drop) = _decoder_positions(model, batch, contrast="drop")
    kept = drop_pos[0][: L_drop]
    assert L_drop < L and bool(torch.isin(kept, main_pos[0]).all())  # a subset of the shifted ones


NEXT_CASES = [c for c in CASES if c[0] == "llava-next"]
NEXT_IDS = [i for i, c in zip(IDS, CASES) if c[0] == "llava-next"]


def video_batch(model, variant, frames=3):
    """LLaVA-NeXT's video input: sample 0 holds one placeholder whose entry in ``images`` is a
    ``[frames, 3, H, W]`` clip with modality "video" (the splice pools each frame's features);
    sample 1 an image, sample 2 text-only (its zero image)."""
    batch = tiny.batch(model, variant=variant, samples=((3, 1, 6), (2, 1, 4), (5, 0, 4)))
    images = list(batch["images"])
    images[0] = torch.randn(frames, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    batch["images"] = images
    batch["modalities"] = ["video", "image", "image"]
    return batch


@pytest.mark.parametrize("case", NEXT_CASES, ids=NEXT_IDS)
def test_llava_next_video_sample(case, env):
    """A video sample: its pooled frame features are image positions like any image's. Faithful
    mode equals the reference in loss and gradients; drop equals mask on every text row."""
    model = make(case, env, mm_spatial_pool_mode="average", mm_spatial_pool_stride=2)
    batch = video_batch(model, case[1])
    ref = llava_style_reference(model, batch, 0.0, 5.0, 3)
    ref_loss, ref_delta, image, mask = ref.loss, ref.gaps, ref.visual, ref.attention
    frames = batch["images"][0].shape[0]
    per_frame = (model.get_vision_tower().num_patches_per_side // 2) ** 2
    assert int(image[0].sum()) >= frames * per_frame  # the whole clip, pooled, is visual
    out, cal_grads, ref_grads = faithful_step_after_reference(model, batch, ref_loss, 0.0, 5.0, 3)
    calplug.disable(model)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.cal_gaps.reshape(-1), ref_delta, rtol=1e-5, atol=1e-5)
    assert float(out.cal_gaps[0].abs().max()) > 1e-3  # the video moves its caption's logits
    assert_grads_rel_close(cal_grads, ref_grads, 1e-5)
    with torch.no_grad(), calplug.enabled(model, contrast="mask"):
        masked = model(**batch).cal_gaps
    with torch.no_grad(), calplug.enabled(model, contrast="drop"):
        dropped = model(**batch).cal_gaps
    text_rows = (~image & mask.bool())[:, :-1]  # rows at text positions (predicting the next token)
    torch.testing.assert_close(dropped[text_rows], masked[text_rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_drop_keeps_original_positions(case, env):
    """The drop pass is shorter than the main pass but keeps each text token's position
    (transformers < 4.38 cut their rotary table to the sequence length: calplug lengthens it)."""
    model = make(case, env)
    batch = tiny.batch(model, variant=case[1])
    (main_pos, L), (drop_pos, L_drop) = _decoder_positions(model, batch, contrast="drop")
    assert main_pos is None and L_drop < L  # haotian-liu passes None: 0..L-1
    assert int(drop_pos.max()) > L_drop  # text after the image keeps its original position


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_blur_reruns_the_splice_on_blurred_images(case, env):
    """Blur re-runs the codebase's splice on blurred images: the contrast equals the model's own
    whole forward on the images blurred by the definition (`calplug.reference.reference_blur`,
    MGM's auxiliary images too): loss, gaps, weights at alpha 0 and at alpha 1 with pooling."""
    model = make(case, env)
    batch = tiny.batch(model, variant=case[1])
    with calplug.enabled(model, contrast="blur", alpha=0.0, blur_sigma=1e-3):
        same = model(**batch).cal_gaps  # a kernel of width one: the images are unchanged
    assert float(same.abs().max()) < 1e-5
    keys = [k for k in ("images", "images_aux") if batch.get(k) is not None]
    labels = tiny.splice(model, batch)[3]
    forwards = blur_forwards(model, batch, 10.0, keys, labels)
    for setting in (SETTING, POOLED):
        blurred = check_against(model, batch, forwards, setting, gradients=False, gap_atol=1e-5,
                                labels=labels, contrast="blur", blur_sigma=10.0)
    assert float(blurred[0].abs().max()) > 1e-3
    assert torch.count_nonzero(blurred[2]) == 0


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_blur_on_a_sharded_rank_with_only_dummy_images(case, env, monkeypatch):
    """ZeRO-3, simulated: another rank blurs its images, so it runs the vision tower again. This
    rank's samples are all text-only with the zero images LLaVA's loader gives them: it must run
    its vision path too (unchanged pixels) and a placeholder decoder pass, and its loss stays plain
    cross-entropy. Without any pixels it cannot, and stops with the error naming the fix."""
    from calplug import distributed

    model = make(case, env)
    batch = tiny.batch(model, variant=case[1], samples=((3, 0, 6), (5, 0, 4)))
    plain = model(**batch).loss
    offered = []
    monkeypatch.setattr(distributed, "must_agree", lambda model: True)
    monkeypatch.setattr(distributed, "any_rank_each",
                        lambda flags, model: offered.append(list(flags)) or [True, flags[1]])
    tower_runs = []
    tower = model.get_model().get_vision_tower()
    tower.register_forward_hook(lambda *a: tower_runs.append(torch.is_grad_enabled()))
    calplug.enable(model, contrast="blur", blur_sigma=10.0)
    out = model(**batch)
    assert offered == [[False, False]]  # no image positions, pixels to re-run
    assert tower_runs == [True, False]  # the main pass, then the no-grad re-run
    assert torch.count_nonzero(out.cal_gaps) == 0
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=0)
    for key in ("images", "images_aux", "image_sizes"):
        batch.pop(key, None)
    with pytest.raises(CALInputError, match="no pixel values"):
        model(**batch)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_patch_mask_ratio_zero_is_no_contrast_and_one_is_mask(case, env):
    """Tables 8/9 on the LLaVA-style codebases: ratio 0 contrasts nothing, ratio 1 is `mask`."""
    model = make(case, env)
    batch = tiny.batch(model, variant=case[1])
    with calplug.enabled(model, contrast="mask", alpha=0.0):
        masked = model(**batch).cal_gaps
    with calplug.enabled(model, contrast="patch_mask", mask_ratio=0.0, alpha=0.0):
        assert torch.all(model(**batch).cal_gaps == 0)
    with calplug.enabled(model, contrast="patch_mask", mask_ratio=1.0, alpha=0.0):
        torch.testing.assert_close(model(**batch).cal_gaps, masked)


@pytest.mark.parametrize("case", FEW, ids=FEW_IDS)
def test_contrastive_decoding_refuses_the_codebase(case, env):
    """The LLaVA codebases splice the image into inputs_embeds inside their own generate()
    (prepare_inputs_labels_for_multimodal, then transformers' generate on the merged embeddings),
    so the forward that generate() calls never holds pixels or image positions: contrastive
    decoding cannot build its image-blind branch and says so instead of decoding plainly."""
    model = make(case, env).eval()
    batch = tiny.batch(model, variant=case[1], samples=((3, 1, 6),))
    prompt = {k: v for k, v in batch.items() if k not in ("labels",)}
    with pytest.raises(calplug.UnsupportedModelError, match="does not support .*: these codebases splice the image into inputs_embeds inside their own generate"):
        calplug.contrastive_generate(model, max_new_tokens=2, **prompt)
