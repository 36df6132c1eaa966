"""LLaVA-style codebases: haotian-liu LLaVA (1.5 'pad', 1.6 'anyres' + 'spatial_unpad'), the
LLaVA-VL LLaVA-NeXT repo (Llama, Qwen2, Mistral, ... backbones) and MGM (Mini-Gemini).

These share one shape: the causal-LM forward calls
``self.prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask,
past_key_values, labels, images, ...)`` (the *splice*: image features replace the image
placeholder, padding is stripped and re-applied, sequences are truncated to
``config.tokenizer_model_max_length``) and then the Llama / Mistral / Qwen2 / Gemma forward.

During a CAL main pass the splice is wrapped on the instance (restored in ``finally``):

* Labels go in with every ignored text label (-100) replaced by `SENTINEL`. The splice gives
  image features and padding the ignore index, so after it a position whose label is -100 and
  which lies inside the attention mask is exactly an image-feature position; `SENTINEL` is then
  mapped back to -100. This holds for right or left padding, truncation, text-only samples and
  several images per sample, with no upstream code copied or feature counts recomputed.
* The rest of the forward receives ``labels=None``, so the upstream computes no cross-entropy
  of its own (haotian-liu / LLaVA-NeXT via transformers, MGM in its own forward).
* A pre-hook on the decoder (``model.get_model()``) records what it really received (merged
  embeddings, mask, positions): LLaVA-NeXT's ``use_pos_skipping`` randomises positions inside
  the splice, so positions are never recomputed. ``position_ids=None`` means 0..L-1.

Per-codebase parts are only the model-class names and the splice's extra pixel arguments
(``images_aux`` for MGM); everything else is read from the splice's signature. See
docs/llava-style.md.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from calplug.errors import CALInputError, UnsupportedModelError
from calplug.gap import IGNORE_INDEX
from calplug.hookspecs import Integration, MainPass, hookimpl

from . import compat
from .capture import arange_positions, capture_decoder_call, explicit_attention_mask, transform_pixels

# Stands for "ignored text label" while labels pass through the upstream splice. Any value the
# splice never writes itself works; this one fits int32 and int64 labels.
SENTINEL = -987_654_321
SPLICE = "prepare_inputs_labels_for_multimodal"
# Splice / forward arguments that carry pixels, per codebase (blur transforms them).
PIXEL_ARGS = ("images", "images_aux")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    decoder = model.get_model() if hasattr(model, "get_model") else None
    head = getattr(model, "lm_head", None)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Linear) \
            or not callable(getattr(model, SPLICE, None)):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not have the LLaVA-style shape calplug patches "
            f"(get_model() -> decoder, an nn.Linear lm_head, and {SPLICE}); MPT backbones keep "
            "their output projection elsewhere and are not supported"
        )
    return decoder, head


def check(model: nn.Module) -> None:
    decoder_and_head(model)


def _mark(labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None else labels.masked_fill(labels == IGNORE_INDEX, SENTINEL)


class _SpliceSpy:
    """Replaces the instance's splice for one main pass; records what it produced."""

    def __init__(self, model: nn.Module):
        self.original = getattr(model, SPLICE)  # bound method (or an instance attribute)
        self.signature = inspect.signature(self.original)
        self.calls = 0
        self.result = None
        self.bound = None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.bound = dict(bound.arguments)
        given_mask = bound.arguments.get("attention_mask")
        bound.arguments["labels"] = _mark(bound.arguments.get("labels"))
        input_ids = bound.arguments.get("input_ids")
        if given_mask is None and isinstance(input_ids, torch.Tensor):
            # The splice treats None as all ones; an explicit mask makes it return the padding it
            # adds, which tells padding from image features. The forward still receives None.
            bound.arguments["attention_mask"] = torch.ones_like(input_ids, dtype=torch.bool)
        input_ids, position_ids, mask, past, embeds, labels = self.original(*bound.args, **bound.kwargs)
        self.result = dict(input_ids=input_ids, attention_mask=mask, inputs_embeds=embeds,
                           labels=labels)
        return (input_ids, position_ids, mask if given_mask is not None else None, past, embeds,
                None)

    def rerun_with_pixels(self, transform) -> dict:
        """Re-run the splice (no grad, no labels) on transformed pixels: same layout, new features."""
        arguments = dict(self.bound, labels=None)
        for name in PIXEL_ARGS:
            if name in arguments:
                arguments[name] = transform_pixels(arguments[name], transform)
        bound = inspect.BoundArguments(self.signature, arguments)
        with torch.no_grad():
            return {"inputs_embeds": self.original(*bound.args, **bound.kwargs)[4]}


def _input_error_if_unusable(call: dict, labels: torch.Tensor) -> None:
    if call.get("inputs_embeds") is not None:
        raise CALInputError(
            "calplug needs input_ids and images to find the image positions; this forward got "
            "inputs_embeds, which skips the splice: pass input_ids and images instead"
        )
    if call.get("dpo_forward"):
        raise CALInputError(
            "dpo_forward=True returns (logits, labels) for a DPO loss, not a language-model "
            "loss: disable calplug (calplug.disable(model)) for DPO training"
        )
    input_ids = call.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or labels.shape != input_ids.shape:
        raise CALInputError(
            f"labels of shape {tuple(labels.shape)} do not match input_ids of shape "
            f"{tuple(getattr(input_ids, 'shape', ()))}: pass labels as [batch, seq_len] aligned "
            "with input_ids (-100 where no loss is wanted, image placeholder included)"
        )
    if bool((labels == SENTINEL).any()):
        raise CALInputError(f"labels hold {SENTINEL}, the value calplug reserves for ignored "
                            "text labels inside the splice; use -100 for ignored labels")


def main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    labels = call["labels"]
    _input_error_if_unusable(call, labels)
    decoder, lm_head = decoder_and_head(model)
    spy = _SpliceSpy(model)
    had_attr = SPLICE in model.__dict__
    previous = model.__dict__.get(SPLICE)
    model.__dict__[SPLICE] = spy
    try:
        with capture_decoder_call(decoder) as decoder_kwargs:
            output = original_forward(**call)
    finally:
        if had_attr:
            model.__dict__[SPLICE] = previous
        else:
            model.__dict__.pop(SPLICE, None)
    if spy.calls != 1 or spy.result is None:
        raise CALInputError(f"{type(model).__name__}.forward called {SPLICE} {spy.calls} times "
                            "in one training step; calplug expects exactly one call")
    spliced = spy.result
    new_labels = spliced["labels"]
    decoder_kwargs = dict(decoder_kwargs)
    embeds = decoder_kwargs.get("inputs_embeds")
    if embeds is None:  # no images in the batch: the splice returned input_ids unchanged
        with torch.no_grad():
            embeds = decoder.get_input_embeddings()(decoder_kwargs["input_ids"])
        decoder_kwargs["inputs_embeds"] = embeds
        decoder_kwargs.pop("input_ids", None)
    padding = spliced["attention_mask"]
    if padding is None or new_labels.shape != embeds.shape[:2]:
        raise CALInputError(f"{SPLICE} returned labels of shape {tuple(new_labels.shape)} for a "
                            f"sequence of shape {tuple(embeds.shape[:2])}")
    visual = (new_labels == IGNORE_INDEX) & padding.bool()
    new_labels = new_labels.masked_fill(new_labels == SENTINEL, IGNORE_INDEX)
    logits = output[0] if isinstance(output, tuple) else output.logits
    positions = decoder_kwargs.get("position_ids")
    rerun = None
    if any(isinstance(spy.bound.get(name), (torch.Tensor, list, tuple)) for name in PIXEL_ARGS):
        rerun = spy.rerun_with_pixels
    return MainPass(
        output=output, logits=logits, labels=new_labels,
        decoder=compat.contrast_decoder(decoder), lm_head=lm_head,
        decoder_kwargs=decoder_kwargs, visual_mask=visual,
        attention_mask=explicit_attention_mask(decoder_kwargs.get("attention_mask"), embeds),
        position_ids=arange_positions(embeds) if positions is None else positions,
        rerun_with_pixels=rerun,
    )


def refuses_decoding(model) -> str:
    """`Integration.decoding_refusal`: these codebases splice the image inside their own
    ``generate()``, so the forward it calls never holds the image or its positions."""
    return ("these codebases splice the image into inputs_embeds inside their own generate() "
            "(prepare_inputs_labels_for_multimodal, then transformers' generate() on the merged "
            "embeddings), so the forward that generate() calls never holds pixels or image positions "
            "and there is no image-blind branch to build beside it")


# haotian-liu LLaVA and the LLaVA-VL LLaVA-NeXT repo: both ship a `llava` package whose causal-LM
# classes mix in LlavaMetaForCausalLM (the splice); the named classes are listed in errors.
LLAVA_STYLE = Integration(
    name="llava-style",
    model_classes=("LlavaMetaForCausalLM", "LlavaLlamaForCausalLM", "LlavaMistralForCausalLM",
                   "LlavaQwenForCausalLM"),
    main_pass=main_pass,
    decoder_and_head=decoder_and_head,
    check=check,
    pixel_contrasts=True,
    decoding_refusal=refuses_decoding,
)

# MGM (Mini-Gemini): the same splice with `images_aux`, and its own cross-entropy in forward.
MGM = Integration(
    name="mgm",
    model_classes=("MGMMetaForCausalLM", "MGMLlamaForCausalLM", "MGMMistralForCausalLM",
                   "MGMMixtralForCausalLM", "MGMGemmaForCausalLM"),
    main_pass=main_pass,
    decoder_and_head=decoder_and_head,
    check=check,
    pixel_contrasts=True,
    decoding_refusal=refuses_decoding,
)


@hookimpl
def calplug_integrations():
    return [LLAVA_STYLE, MGM]
