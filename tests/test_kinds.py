"""What is particular to the kinds whose image is not spliced at placeholder ids of the text
decoder's sequence (tests/_hf_kinds.py; their family cases run every property of
tests/test_properties.py that applies): the image-blind pass does no vision-tower work, drop and
mask are the same image-free pass, Mllama's rows that see no image, blur's re-run of the vision
path, what lies between decoder and logits, the refusals by nature, ``calplug verify`` and the
support status of each class.
"""
from __future__ import annotations

import pytest
import torch

import calplug
from calplug import UnsupportedModelError, enabling
from calplug.blur import gaussian_blur
from calplug.reference import reference_image_free_step, without_arguments
from _recording import record_calls
import _hf_kinds as kinds
from _hf_kinds import KINDS, POSITIONS, SEQ2SEQ

ELSEWHERE = [name for name, f in KINDS.items() if f.kind != POSITIONS]


def built(name, padding_side="right"):
    family = KINDS[name]
    reason = family.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    model = family.build(0).train()
    return family, model, family.batch(model, padding_side, family.text_only)


def target_logits(logits, labels, shift):
    rows = logits[:, :-1] if shift else logits
    targets = labels[:, shift:].clamp(min=0)
    return rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()


# -- the image-blind pass ---------------------------------------------------------------------------
@pytest.mark.parametrize("contrast", ["drop", "mask"])
@pytest.mark.parametrize("name", list(KINDS))
def test_the_image_blind_pass_does_no_vision_tower_work(name, contrast):
    """The vision tower runs once, in the main pass: the contrast pass re-runs the text decoder
    (and an encoder-decoder model's encoder, on the text alone) on what the main pass recorded."""
    family, model, batch = built(name)
    with calplug.enabled(model, contrast=contrast), record_calls(family.vision(model)) as vision, \
            record_calls(family.decoder(model)) as decoder:
        out = model(**batch)
    assert len(vision) == 1 and len(decoder) == 2
    assert out.cal_gaps[0].abs().max() > 0


@pytest.mark.parametrize("name", ELSEWHERE)
def test_drop_and_mask_are_the_same_image_free_pass(name):
    """No position is removed or hidden for these kinds: drop (the samples with an image) and
    mask (every sample) give the same gaps on every row; samples without an image get none."""
    family, model, batch = built(name)
    with calplug.enabled(model, contrast="drop", alpha=0.0):
        drop = model(**batch).cal_gaps
    with calplug.enabled(model, contrast="mask", alpha=0.0):
        mask = model(**batch).cal_gaps
    # every row but padding (which drop leaves out of its pass, as for every kind: docs/cal.md)
    rows = torch.ones_like(drop, dtype=torch.bool) if family.kind == SEQ2SEQ else \
        batch["attention_mask"][:, :-1].bool()
    torch.testing.assert_close(drop[rows], mask[rows], rtol=1e-5, atol=1e-6)
    with_image = family.with_image(model, batch)
    assert torch.all(drop[~with_image] == 0) and drop[with_image].abs().max() > 1e-4


@pytest.mark.parametrize("name", ELSEWHERE)
def test_patch_mask_is_refused_where_the_image_has_no_positions(name):
    _, model, _ = built(name)
    with pytest.raises(UnsupportedModelError, match="no share of .*image positions for patch_mask"):
        calplug.enable(model, contrast="patch_mask")
    assert not calplug.is_enabled(model)


# -- Mllama's rows that see no image ----------------------------------------------------------------
def test_mllama_rows_before_the_image_get_the_measured_gap_and_text_only_samples_none():
    """transformers' Mllama zeroes only the MLP half of a cross-attention layer for text rows whose
    cross-attention mask is empty; its attention half attends to every tile of the sample. So the
    rows before the first <|image|> of an image sample do depend on the image, and their gap is
    that measured effect (the model's own forward without the pixel inputs gives the same
    numbers). A text-only sample in a batch with images depends on its zero padding tiles the same
    way, but it has no image to take away: gap 0, weight alpha."""
    family, model, batch = built("mllama")
    before = (batch["cross_attention_mask"].flatten(2).sum(-1) == 0) & batch["attention_mask"].bool()
    assert before[0, :2].all() and before[2].sum() > 0  # rows 0-1 of sample 0; all of sample 2
    with torch.no_grad(), calplug.enabled(model, contrast="mask", alpha=0.0, pool_window=1):
        gaps = model(**batch).cal_gaps
    with torch.no_grad():
        _, ref_gaps, _ = reference_image_free_step(
            model, batch, without_arguments(batch, kinds.MLLAMA_IMAGE_ARGS),
            kinds.mllama_with_image(model, batch), 0.0, 5.0, 1)
        logits = model(**batch).logits
        blind = model(**without_arguments(batch, kinds.MLLAMA_IMAGE_ARGS)).logits
    torch.testing.assert_close(gaps.reshape(-1), ref_gaps, rtol=1e-5, atol=1e-6)
    assert gaps[0, :2].abs().min() > 1e-4          # rows at positions 0-1, before the image: measured
    leak = (logits[2] - blind[2]).abs().max()
    assert leak > 1e-3 and torch.all(gaps[2] == 0)                     # leaks, yet no contrast


# -- blur: the vision path re-run on blurred pixels -----------------------------------------------------
@pytest.mark.parametrize("name", [n for n in KINDS if KINDS[n].blur])
def test_blur_re_runs_the_vision_path_on_blurred_pixels(name):
    """blur's contrast side is the model's own forward on blurred pixels (the states its vision
    path makes from them reach the decoder as in the main pass), for the samples with an image."""
    family, model, batch = built(name)
    sigma = 2.0
    with torch.no_grad(), calplug.enabled(model, contrast="blur", blur_sigma=sigma, alpha=0.0):
        gaps = model(**batch).cal_gaps
    blurred = dict(batch, pixel_values=gaussian_blur(batch["pixel_values"], sigma))
    with torch.no_grad():
        main = target_logits(family.text_logits(model, model(**batch).logits), batch["labels"],
                             family.label_shift)
        other = target_logits(family.text_logits(model, model(**blurred).logits), batch["labels"],
                              family.label_shift)
    with_image = family.with_image(model, batch)
    expected = torch.where(with_image.unsqueeze(1), main - other, torch.zeros_like(main))
    torch.testing.assert_close(gaps, expected, rtol=1e-4, atol=1e-5)
    assert gaps[with_image].abs().max() > 1e-5


# -- between the decoder and the logits ----------------------------------------------------------------
def test_a_scalar_between_decoder_and_head_is_taken_over():
    """T5 with tied embeddings rescales the decoder's output by d_model ** -0.5 before lm_head
    (BLIP-2's T5 here): the contrast side gets the same scale, so faithful mode equals the
    reference (its case passes) and the gaps are not those of the unscaled states."""
    family, model, batch = built("blip_2_t5")
    assert model.config.text_config.tie_word_embeddings
    main = enabling.find_integration(model).main_pass(model, model.forward, dict(batch))
    hidden = torch.randn(2, 3, model.config.text_config.d_model)
    torch.testing.assert_close(main.decoder.after(hidden), hidden * model.config.text_config.d_model ** -0.5)


@pytest.mark.parametrize("what", ["hidden", "logits"])
def test_an_unknown_map_between_decoder_and_logits_is_refused(what):
    """A forward that changes the hidden states before the output projection (not by a scalar), or
    the projection's logits (not by a soft-capping its config names), is refused at the step,
    naming the class: the contrast side's target logits would not be the model's."""
    family, model, batch = built("florence2")
    head = model.get_output_embeddings()
    handle = None
    if what == "hidden":
        handle = head.register_forward_pre_hook(lambda m, args: (torch.tanh(args[0]),))
        match = "between its text decoder and its output projection"
    else:  # a release whose forward scales the logits after lm_head

        class Scaled(type(model)):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out["logits"] = out.logits * 2.0
                return out

        model.__class__ = Scaled
        match = "transforms the output projection's logits"
    try:
        with calplug.enabled(model), pytest.raises(UnsupportedModelError, match=match) as raised:
            model(**batch)
    finally:
        if handle is not None:
            handle.remove()
    assert type(model).__name__ in str(raised.value)


# -- encoder-decoder label alignment ------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in KINDS if KINDS[n].kind == SEQ2SEQ])
def test_encoder_decoder_weights_align_with_the_labels(name):
    """The caller sees the model's own logits shape, and cal_weights / cal_gaps [B, L] with row i
    weighting label i; ignored labels (right padding) are where the model ignores them."""
    family, model, batch = built(name)
    own = model(**batch)
    with calplug.enabled(model, alpha=0.0):
        out = model(**batch)
    labels = batch["labels"]
    assert out.logits.shape == own.logits.shape and out.cal_weights.shape == labels.shape
    with torch.no_grad():
        per_row = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(),
                                                    reduction="none").view(labels.shape)
    w = out.cal_weights
    supervised = labels != -100
    torch.testing.assert_close(out.loss, (per_row * w)[supervised].sum() / (w[supervised].sum() + 1e-6),
                               rtol=1e-5, atol=0)


# -- refused by nature ------------------------------------------------------------------------------------
IMAGE_ONLY = ["Pix2StructForConditionalGeneration", "VisionEncoderDecoderModel",
              "PPFormulaNetForConditionalGeneration"]


def build_pix2struct():
    from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

    config = Pix2StructConfig(
        text_config=dict(vocab_size=kinds.VOCAB, hidden_size=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
        vision_config=dict(hidden_size=32, patch_embed_hidden_size=32, d_ff=64, d_kv=8, num_hidden_layers=1,
                           num_attention_heads=4))
    return Pix2StructForConditionalGeneration(config)


@pytest.mark.parametrize("class_name", IMAGE_ONLY)
def test_image_only_encoders_are_refused_by_nature(class_name):
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        pytest.skip(f"{class_name} is not in transformers {transformers.__version__}")
    integration = next(i for i in calplug.plugins.integrations() if class_name in i.model_classes)
    status, reason = integration.support_status(cls)
    assert status == "refused" and "only the image" in reason and "CAL has no meaning" in reason
    if class_name == "Pix2StructForConditionalGeneration":
        model = build_pix2struct()
        with pytest.raises(UnsupportedModelError, match="its encoder's input is only the image"):
            calplug.enable(model)
        assert not calplug.is_enabled(model)


def test_blip_2_with_a_decoder_only_language_model_is_not_this_kind():
    """BLIP-2 is the encoder-decoder kind only with T5; with OPT the integration of this kind does
    not claim it (the placeholder integration decides)."""
    from _hf_qformer import build_blip_2

    _, t5, _ = built("blip_2_t5")
    assert enabling.find_integration(t5).name == "transformers-encoder-decoder"
    opt = build_blip_2(0)
    assert enabling.find_integration(opt).name != "transformers-encoder-decoder"


def test_blip_2_t5_query_prefix_of_older_releases():
    """Before placeholder ids (a config without image_token_index), transformers up to 4.49 puts
    BLIP-2's queries in front of the text: the encoder's image positions are that prefix, hidden
    in the image-free pass; faithful mode equals the reference that hides them."""
    if kinds.tf_version() > (4, 49):
        pytest.skip("transformers after 4.49 (4.57.6 and 5.x checked) splices BLIP-2's queries only "
                    "at placeholder ids; run tox -e hf-4.45 or hf-4.49 for the prefix layout")
    from calplug.reference import hide_positions_hook

    model = kinds.build_blip_2_t5(0, placeholders=False).train()
    batch = kinds.seq2seq_batch(0, text_only=False,
                                pixels=lambda g, n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)})
    B, L = batch["input_ids"].shape
    hidden = torch.zeros(B, 4 + L, dtype=torch.bool)
    hidden[:, :4] = True
    hooks = ((model.language_model.encoder, hide_positions_hook(hidden, "attention_mask")),
             (model.language_model.decoder, hide_positions_hook(hidden, "encoder_attention_mask")))
    ref_loss, ref_gaps, _ = reference_image_free_step(model, batch, batch, hidden.any(1), 0.0, 5.0, 3,
                                                      hooks=hooks, shift=0)
    with calplug.enabled(model, contrast="mask", pool_scope="flat", alpha=0.0, beta=5.0, pool_window=3):
        out = model(**batch)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.cal_gaps.reshape(-1), ref_gaps, rtol=1e-5, atol=1e-6)
    assert out.cal_gaps.abs().max() > 1e-3


# -- calplug verify and the support status ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(KINDS))
def test_verify_passes_on_every_kind(name):
    family, model, batch = built(name)
    report = calplug.verify(model, batch)
    assert report.passed, report.table()
    names = {c.name for c in report.checks}
    where = ("image positions cover where the pixels enter" if family.kind == POSITIONS
             else "image samples cover where the pixels enter")
    assert where in names and "faithful = two-forward reference: gradients" in names
    assert report.support[0] == "proven" and family.display in report.support[1]


@pytest.mark.parametrize("name", list(KINDS))
def test_support_status_of_each_class_comes_from_its_integration(name):
    """Asked with the class (as the support matrix asks), the integration that names it says
    proven, naming the kind and the family cases; BLIP-2.s classes (InstructBLIP too) are this kind only with T5, so
    that answer comes with the model (the class's own status is its placeholder integration's)."""
    import transformers

    family, model, _ = built(name)
    cls = getattr(transformers, family.class_name)
    answers = [i.support_status(cls) for i in calplug.plugins.integrations() if i.support_status is not None]
    answers = [a for a in answers if a is not None]
    if name.endswith("_t5"):
        assert not any("encoder-decoder" in reason for _, reason in answers)
        answers = [enabling.find_integration(model).support_status(model)]
    status, reason = answers[0]
    assert status == "proven" and f"hf-{name}-*" in reason
    assert (family.kind if family.kind != POSITIONS else "spliced inside the text model") in reason


def test_idefics_decoupled_head_gives_the_added_tokens_their_own_rows():
    """Idefics' released checkpoints add tokens (<image>, <fake_token_around_image>) in a decoupled
    embedding and head (``additional_vocab_size``): their logits come from ``additional_fc``. The
    contrast side reads those rows too: the gaps of targets among the added tokens equal the full
    logits' with and without the image. (transformers 5.x's own Idefics loss fails with added
    tokens, so this compares full logits, not the model's loss.)"""
    family = KINDS["idefics"]
    if family.skip_reason() is not None:
        pytest.skip(family.skip_reason())
    model = kinds.build_idefics(0, added=2).train()
    batch = kinds.idefics_batch(model)
    added = batch["labels"][:, 1:] >= model.config.vocab_size
    assert added.any()
    from calplug.scoring import dropout_off

    with dropout_off(model), torch.no_grad():
        found = calplug.token_gaps(model, batch, contrast="mask")
        call = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**call).logits
        blind = model(**dict(call, image_attention_mask=torch.zeros_like(call["image_attention_mask"]))).logits
    expected = target_logits(logits, batch["labels"], 1) - target_logits(blind, batch["labels"], 1)
    rows = added & found.with_image.unsqueeze(1)
    assert rows.any()
    torch.testing.assert_close(found.gaps[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert found.gaps[rows].abs().max() > 1e-4


def test_git_between_4_49_and_5_14_is_refused_with_the_upstream_bug():
    """transformers 4.49-5.14's GIT hands its flattened text logits and labels[:, 1:] to
    ForCausalLMLoss, which shifts the labels again (its own objective pairs each row with the
    token after its target): those releases are refused, naming it; 4.45-4.48 and from 5.15 the
    family cases run."""
    from _hf_prefix import build_git

    model = build_git(0)
    if (4, 49) <= kinds.tf_version() < (5, 15):
        with pytest.raises(UnsupportedModelError, match="shifts the labels once more.*>= 5.15"):
            calplug.enable(model)
        assert not calplug.is_enabled(model)
    else:
        calplug.enable(model)
        assert calplug.is_enabled(model)


def test_florence2_before_5_13_is_refused_with_the_upstream_bug():
    """transformers 4.56-5.12's Florence-2 computes its own loss as a causal LM's, shifting labels
    its decoder input is already shifted from (its own training objective skips a token): those
    releases are refused, naming it; from 5.13 the family cases run."""
    import transformers

    if not hasattr(transformers, "Florence2ForConditionalGeneration"):
        pytest.skip(f"Florence2ForConditionalGeneration needs transformers >= 4.56 (installed "
                    f"{transformers.__version__})")
    model = kinds.build_florence2(0)
    if kinds.tf_version() < (5, 13):
        with pytest.raises(UnsupportedModelError, match="ForCausalLMLoss without shift_labels.*5.13"):
            calplug.enable(model)
        assert not calplug.is_enabled(model)
    else:
        calplug.enable(model)
        assert calplug.is_enabled(model)
