"""The cross-attention kind: transformers VLMs whose text decoder reaches the image only through
cross-attention states, never at positions of its sequence. Mllama (Llama 3.2 Vision): a vision
tower and projector make ``cross_attention_states``; the text decoder's cross-attention layers
attend to them, masked per text row by ``cross_attention_mask``.

**The image-blind pass** is the same text with the cross-attention layers given no image: the
decoder's call with its image arguments set to None (`CrossAttentionFacts.image_kwargs`). For
Mllama that is no ``cross_attention_states`` (nor their masks), and its decoder then skips the
cross-attention layers: the text passes through them unchanged, exactly as in its own text-only
forward. Nothing of the vision path runs again: the contrast pass re-runs the text decoder alone
(`MainPass.image_free`; the decoder's recorded call, its token ids embedded by its own table).

**Which samples are contrasted**: the samples the image reaches by the batch's own declaration
(`CrossAttentionFacts.samples`: a non-zero ``cross_attention_mask`` row; with no mask, every
sample that has pixels). A sample without one (a text-only sample in a batch with images, whose
pixels are the processor's zero padding) has nothing to take away: gap 0, weight alpha, as a
text-only sample of every kind. **Rows of a contrasted sample that see no image by the mask**
(the text before the first ``<|image|>``) are contrasted like every other row: transformers'
Mllama zeroes only the MLP half of a cross-attention layer for them, and its attention half
attends to all of the sample's image tiles, so the image does move their logits; their gap is
that measured effect (the model's own forward without the pixel inputs gives the same numbers,
which is what the reference and the family cases compare). docs/transformers.md says why.

**Contrasts.** ``drop`` and ``mask`` are the same image-free pass here (no position is removed or
hidden; ``drop`` runs only the samples with an image, ``mask`` every sample); ``blur`` re-runs the
vision path on blurred pixels and hands the decoder the cross-attention states it makes
(`MainPass.rerun_with_pixels`); ``patch_mask`` hides a share of the image positions of the
decoder sequence, which this kind has none of: refused at ``enable``.

The independent reference (`calplug.reference.reference_image_free_step`) is the model's own
forward without the arguments that carry the image (`CrossAttentionFacts.image_arguments`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

from calplug.classes import first_named
from calplug.errors import CALInputError, UnsupportedModelError
from calplug.hookspecs import Integration, MainPass, ReferencePass, hookimpl
from calplug.inputs import has_pixels
from calplug.reference import without_arguments

from . import compat, text_decoder
from .capture import decoder_inputs_with, transform_pixels

KIND = "cross-attention"
NO_POSITIONS = ("{cls}: the image reaches the text through {how}, not at positions of the "
                "decoder sequence, so there is no share of image positions for patch_mask to "
                "hide; use drop (the default), mask (the same image-free pass here) or blur")


def mllama_samples(call: dict, batch: int, device) -> torch.Tensor:
    """The samples Mllama's image reaches: a non-zero row of ``cross_attention_mask`` ``[B, L,
    images, tiles]``; without that mask its cross-attention attends to every tile, so every sample
    that has pixels (or ready ``cross_attention_states``)."""
    mask = call.get("cross_attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.reshape(mask.shape[0], -1).ne(0).any(1).to(device)
    given = has_pixels(call, ("pixel_values",)) or call.get("cross_attention_states") is not None
    return torch.full((batch,), given, dtype=torch.bool, device=device)


@dataclasses.dataclass(frozen=True)
class CrossAttentionFacts:
    """One class of the kind.

    image_kwargs:    the text decoder's arguments that carry the image; the image-free pass hands
                     it None for each.
    image_arguments: the forward's arguments that carry the image; the reference's second forward
                     leaves them out.
    pixel_keys:      forward arguments holding images ``[..., H, W]`` (``blur`` transforms them).
    rerun_kwargs:    the decoder arguments a pixel re-run replaces (the states the vision path makes).
    samples:         ``fn(call, B, device) -> bool [B]``: the samples the image reaches.
    """

    family: str
    key: str
    class_name: str
    since: tuple[int, int]
    image_kwargs: tuple[str, ...]
    image_arguments: tuple[str, ...]
    pixel_keys: tuple[str, ...]
    rerun_kwargs: tuple[str, ...]
    samples: Callable[[dict, int, object], torch.Tensor]
    how: str = "cross-attention layers"


FACTS: dict[str, CrossAttentionFacts] = {
    "MllamaForConditionalGeneration": CrossAttentionFacts(
        "Mllama", "mllama", "MllamaForConditionalGeneration", (4, 45),
        image_kwargs=("cross_attention_states", "cross_attention_mask", "full_text_row_masked_out_mask"),
        image_arguments=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask",
                         "cross_attention_states"),
        pixel_keys=("pixel_values",), rerun_kwargs=("cross_attention_states",), samples=mllama_samples,
        how="the cross-attention layers of its text decoder (cross_attention_states)"),
}


def facts_of(model: nn.Module) -> CrossAttentionFacts:
    facts = first_named(model, FACTS)
    if facts is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a class of calplug's cross-attention "
                                    f"integration ({', '.join(FACTS)})")
    return facts


def _no_image(samples: torch.Tensor, names: tuple[str, ...]) -> dict:
    """`MainPass.image_free`: the decoder's image arguments, each None (for any samples)."""
    return {name: None for name in names}


def _rerun(transform, original_forward, decoder, call: dict, facts: CrossAttentionFacts) -> dict:
    """`MainPass.rerun_with_pixels`: the model's own vision path on transformed pixels, up to the
    decoder call; the states it hands the decoder (no grad)."""
    changed = {k: transform_pixels(v, transform) if k in facts.pixel_keys else v for k, v in call.items()}
    return decoder_inputs_with(original_forward, decoder, changed, facts.rerun_kwargs)


def cross_attention_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    facts = facts_of(model)
    labels = call.pop("labels")
    compat.check_full_logits(call)
    decoder, head = compat.vlm_decoder_and_head(model)
    call = text_decoder.without_cache(model, call)
    recorded = text_decoder.run_recorded(original_forward, call, decoder, head)
    logits = text_decoder.logits_of(recorded.output)
    after, transform = text_decoder.head_map(model, recorded, logits)
    kwargs = text_decoder.contrast_call(decoder, recorded.decoder_kwargs)
    embeds = kwargs["inputs_embeds"]
    if tuple(labels.shape) != tuple(embeds.shape[:2]):
        raise CALInputError(f"labels of shape {tuple(labels.shape)} do not match the text of shape "
                            f"{tuple(embeds.shape[:2])}: pass labels as [batch, seq_len] aligned with "
                            "input_ids (-100 where no loss is wanted)")
    B = embeds.shape[0]
    rerun = None
    if has_pixels(call, facts.pixel_keys):
        rerun = functools.partial(_rerun, original_forward=original_forward, decoder=decoder,
                                  call=call, facts=facts)
    return MainPass(
        output=recorded.output, logits=logits, labels=labels,
        decoder=text_decoder.contrast_decoder(decoder, after), lm_head=head, decoder_kwargs=kwargs,
        visual_mask=torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device),
        attention_mask=text_decoder.padding_mask(kwargs, embeds),
        position_ids=text_decoder.positions(kwargs, embeds),
        image_samples=facts.samples(call, B, embeds.device),
        image_free=functools.partial(_no_image, names=facts.image_kwargs),
        rerun_with_pixels=rerun, logit_transform=transform)


@dataclasses.dataclass(frozen=True)
class MainPassOf:
    """`Integration.main_pass` (a plain record, not a closure: an enabled model pickles)."""

    def __call__(self, model: nn.Module, original_forward, call: dict) -> MainPass:
        return cross_attention_main_pass(model, original_forward, call)


def check(model: nn.Module) -> None:
    facts = facts_of(model)
    compat.require_release(facts.family, facts.since)
    compat.vlm_decoder_and_head(model)


def refuses_contrast(model: nn.Module, contrast: str) -> str | None:
    if contrast == "patch_mask":
        return NO_POSITIONS.format(cls=type(model).__name__, how=facts_of(model).how)
    return None


def reference_pass(model: nn.Module, batch: dict) -> ReferencePass:
    """The reference's image-free forward: the model's own, without the image's arguments."""
    facts = facts_of(model)
    ids = batch["input_ids"]
    return ReferencePass(without_arguments(batch, facts.image_arguments),
                         facts.samples(batch, ids.shape[0], ids.device))


PROVEN = {name: (f.family, f.key, KIND) for name, f in FACTS.items()}


def support_status(model_or_class) -> tuple[str, str] | None:
    return text_decoder.status_of(model_or_class, PROVEN, {})


INTEGRATIONS = [
    Integration(name=f"transformers-{facts.key}", model_classes=(facts.class_name,), main_pass=MainPassOf(),
                decoder_and_head=compat.vlm_decoder_and_head, check=check,
                pixel_contrasts=bool(facts.pixel_keys), contrast_refusal=refuses_contrast,
                support_status=support_status, reference_pass=reference_pass)
    for facts in FACTS.values()
]


@hookimpl
def calplug_integrations():
    return INTEGRATIONS
