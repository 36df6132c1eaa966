"""`calplug.token_gaps`: the training step's contrast machinery, called outside training; and the
image-blind pass for images that do not sit at positions of the decoder sequence
(`MainPass.image_samples`, `MainPass.image_free`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import calplug
from calplug import CALInputError, plugins
from calplug.hookspecs import Integration, hookimpl
from calplug.integrations import transformers_vlm
from calplug.reference import mask_image_hook
from calplug.scoring import dropout_off
from calplug.testing import llava_batch, tiny_llava


@pytest.fixture
def llava():
    return tiny_llava(seed=0).train()


@pytest.mark.parametrize("contrast", ["drop", "mask"])
def test_token_gaps_are_the_training_steps(llava, contrast):
    """Same main pass, same contrast pass, same weighting: the training forward's cal_gaps and
    cal_weights, bit for bit; and the model is left as it was (enabled, same config)."""
    batch = llava_batch(llava)
    calplug.enable(llava, contrast=contrast, alpha=0.0)
    with dropout_off(llava):
        out = llava(**batch)
        found = calplug.token_gaps(llava, batch)
    assert torch.equal(found.gaps, out.cal_gaps) and torch.equal(found.weights, out.cal_weights)
    assert found.gaps[0].abs().max() > 0 and torch.all(found.gaps[2] == 0)   # sample 2: text only
    assert not found.contrasted[2].any() and found.contrasted[0].any()
    assert torch.equal(found.with_image, torch.tensor([True, True, False]))
    assert calplug.config_of(llava).contrast == contrast and found.config.alpha == 0.0


def test_token_gaps_of_a_model_that_is_not_enabled(llava):
    batch = llava_batch(llava)
    found = calplug.token_gaps(llava, batch, contrast="mask", alpha=1.0, beta=2.0)
    assert not calplug.is_enabled(llava)
    assert found.config.contrast == "mask"
    assert float(found.weights[found.supervised].min()) >= 1.0 and float(found.weights.max()) <= 2.0


def test_log_probabilities_with_and_without_the_image_match_full_softmaxes(llava):
    """log p(target | image) from the model's own logits; log p(target | without it) from the
    model's own forward with attention to the image positions removed (calplug.reference's hook):
    both with a full float32 log-softmax over the vocabulary, which token_gaps never makes."""
    batch = llava_batch(llava)
    with dropout_off(llava), torch.no_grad():
        found = calplug.token_gaps(llava, batch, contrast="mask", log_probs=True)
        targets = batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)
        logits = llava(**batch).logits[:, :-1].float()
        decoder = llava.get_decoder()
        handle = decoder.register_forward_pre_hook(mask_image_hook(found.visual), with_kwargs=True)
        try:
            logits_wo = llava(**batch).logits[:, :-1].float()
        finally:
            handle.remove()
    with_image = torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1)
    without = torch.log_softmax(logits_wo, -1).gather(-1, targets).squeeze(-1)
    rows = found.contrasted
    torch.testing.assert_close(found.log_prob_with, with_image, rtol=0, atol=2e-5)
    torch.testing.assert_close(found.log_prob_without[rows], without[rows], rtol=0, atol=2e-5)
    assert torch.equal(found.log_prob_without[~rows], found.log_prob_with[~rows])  # gain 0 there
    gain = found.log_prob_gain
    assert gain[rows].abs().max() > 1e-3 and torch.all(gain[~rows] == 0)


def test_token_gaps_refuses_what_it_cannot_score(llava):
    batch = llava_batch(llava)
    with pytest.raises(CALInputError, match="needs labels"):
        calplug.token_gaps(llava, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(CALInputError, match="dict of forward arguments"):
        calplug.token_gaps(llava, list(batch.values()))
    with pytest.raises(CALInputError, match="log_probs=True"):
        calplug.token_gaps(llava, batch).log_prob_gain
    with pytest.raises(calplug.CALConfigError, match="not a registered contrast"):
        calplug.token_gaps(llava, batch, contrast="nope")


# -- an image that does not sit at positions of the decoder sequence --------------------------------
@dataclasses.dataclass(frozen=True)
class ImageAsDecoderInput:
    """The tiny Llava, presented as a model whose image reaches the text only through its decoder
    inputs, as a cross-attention model's does: no visual positions, the samples with an image
    named, and `image_free` giving the decoder inputs without it (the image embeddings replaced by
    token 0's)."""

    def __call__(self, model, original_forward, call):
        main = transformers_vlm.MainPassOf()(model, original_forward, call)
        visual, embeds = main.visual_mask, main.decoder_kwargs["inputs_embeds"]
        pad = model.get_input_embeddings().weight[0]

        def image_free(samples):
            free = embeds.detach().clone()
            free[visual] = pad.to(free.dtype)
            CALLS.append(samples.tolist())
            return {"inputs_embeds": free[samples]}

        return dataclasses.replace(main, visual_mask=torch.zeros_like(visual),
                                   image_samples=visual.any(1), image_free=image_free)


CALLS: list = []


class Plugin:
    @hookimpl
    def calplug_integrations(self):
        return [Integration("image-as-input", ("LlavaForConditionalGeneration",), ImageAsDecoderInput())]


@pytest.mark.parametrize("contrast", ["drop", "mask"])
def test_the_image_blind_pass_takes_the_integrations_image_free_inputs(llava, contrast):
    """With no visual position at all, the contrasts still contrast exactly the samples the image
    reaches, through the integration's image-free inputs: drop runs only those samples, mask runs
    every sample; both equal the model's own forward on those inputs at every text row."""
    plugins.register(Plugin(), name="test-image-as-input")
    CALLS.clear()
    try:
        batch = llava_batch(llava)
        with dropout_off(llava):
            found = calplug.token_gaps(llava, batch, contrast=contrast)
    finally:
        plugins.unregister(name="test-image-as-input")
    assert not found.visual.any() and torch.equal(found.with_image, torch.tensor([True, True, False]))
    assert found.contrasted[:2].all() and not found.contrasted[2].any()
    # the expected gaps: the model's own forward, and again with its decoder handed those inputs
    visual = transformers_vlm.MainPassOf()(llava, llava.forward, dict(batch)).visual_mask
    with dropout_off(llava), torch.no_grad():
        logits = llava(**batch).logits

        def swap(module, args, kwargs):
            free = kwargs["inputs_embeds"].clone()
            free[visual] = llava.get_input_embeddings().weight[0]
            return args, dict(kwargs, inputs_embeds=free)

        handle = llava.get_decoder().register_forward_pre_hook(swap, with_kwargs=True)
        try:
            logits_free = llava(**batch).logits
        finally:
            handle.remove()
    targets = batch["labels"][:, 1:].clamp(min=0).unsqueeze(-1)
    expected = (logits[:, :-1].gather(-1, targets) - logits_free[:, :-1].gather(-1, targets)).squeeze(-1)
    rows = found.contrasted & batch["attention_mask"][:, 1:].bool()
    torch.testing.assert_close(found.gaps[rows], expected[rows].float(), rtol=0, atol=1e-5)
    assert found.gaps[rows].abs().max() > 1e-2
