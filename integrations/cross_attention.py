"""The cross-attention kind: transformers VLMs whose text decoder reaches the image only through
cross-attention states, never at positions of its sequence. Mllama (Llama 3.2 Vision): a vision
tower and projector make ``cross_attention_states``; the text decoder's cross-attention layers
attend to them, masked per text row by ``cross_attention_mask``. BLIP's captioner: its BERT text
decoder cross-attends to the vision encoder's ``encoder_hidden_states``. Idefics (1): gated
cross-attention layers between the decoder layers attend to the (resampled) image states, gated
per text row by ``image_attention_mask``.

**The image-blind pass** is the same text with the cross-attention layers given no image: the
decoder's call with its image arguments set to None (`CrossAttentionFacts.image_kwargs`). For
Mllama that is no ``cross_attention_states`` (nor their masks), and its decoder then skips the
cross-attention layers: the text passes through them unchanged, exactly as in its own text-only
forward; BLIP's layers skip their cross-attention without ``encoder_hidden_states``. Idefics'
decoder cannot run without image inputs, so its "no image" is its own text-only representation:
an all-zero ``image_attention_mask``, which gates every row's cross-attention output to zero (the
image states it is then handed are zeros: no vision work). Nothing of the vision path runs again:
the contrast pass re-runs the text decoder alone (`MainPass.image_free`; the decoder's recorded
call, its token ids embedded by its own table).

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
forward without the arguments that carry the image (Mllama), with its text decoder handed no
``encoder_hidden_states`` (BLIP: its forward needs pixels), or with an all-zero
``image_attention_mask`` (Idefics).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

from calplug.errors import CALInputError, UnsupportedModelError, warn_once
from calplug.hookspecs import Integration, MainPass, ReferencePass, hookimpl
from calplug.inputs import has_pixels
from calplug.reference import drop_arguments_hook, without_arguments

from . import compat, text_decoder
from .capture import decoder_inputs_with, transform_pixels

KIND = "the cross-attention kind"
SMOOTHING = ("calplug: {cls}'s own loss smooths its labels (label_smoothing={value}); the CAL loss is "
             "the weighted cross-entropy of docs/cal.md, without smoothing, so with unit weights it "
             "is the unsmoothed cross-entropy, not the model's own loss")
NO_POSITIONS = ("the image reaches the text through {how}, not at positions of the "
                "decoder sequence, so there is no share of image positions for patch_mask to "
                "hide; use drop (the default), mask (the same image-free pass here) or blur")


# -- which samples the image reaches ---------------------------------------------------------------------
def mllama_samples(call: dict, batch: int, device) -> torch.Tensor:
    """The samples Mllama's image reaches: a non-zero row of ``cross_attention_mask`` ``[B, L,
    images, tiles]``; without that mask its cross-attention attends to every tile, so every sample
    that has pixels (or ready ``cross_attention_states``)."""
    mask = call.get("cross_attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.reshape(mask.shape[0], -1).ne(0).any(1).to(device)
    given = has_pixels(call, ("pixel_values",)) or call.get("cross_attention_states") is not None
    return torch.full((batch,), given, dtype=torch.bool, device=device)


def idefics_samples(call: dict, batch: int, device) -> torch.Tensor:
    """Idefics: a non-zero row of ``image_attention_mask`` ``[B, L, images]`` (its gate lets the
    cross-attention output through only there)."""
    mask = call.get("image_attention_mask")
    if not isinstance(mask, torch.Tensor):
        raise CALInputError("Idefics needs image_attention_mask (its processor's output) to know which "
                            "text rows attend to which image")
    return mask.reshape(mask.shape[0], -1).ne(0).any(1).to(device)


def every_sample(call: dict, batch: int, device) -> torch.Tensor:
    """BLIP: its forward takes one image per sample."""
    return torch.ones(batch, dtype=torch.bool, device=device)


# -- where the decoder is, and what the decoder needs without the image -------------------------------------
def blip_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """BLIP's captioner: the BERT text model of its text decoder, and the prediction head's output
    projection (its transform between the two is `blip_between`)."""
    text = getattr(model, "text_decoder", None)
    if text is None or not hasattr(text, "bert"):
        raise UnsupportedModelError(f"cannot find the text decoder of {type(model).__name__} (text_decoder.bert)")
    return text.bert, text.get_output_embeddings()


def blip_between(model: nn.Module) -> nn.Module:
    return model.text_decoder.cls.predictions.transform


class IdeficsWithoutImage(text_decoder.ContrastDecoder):
    """Idefics' decoder as the image-free pass calls it: handed no image (every image argument
    None), it gets its own text-only representation, an all-zero ``image_attention_mask`` (the
    gate then zeroes every row's cross-attention output) and zero image states of the main pass's
    shape per image (so neither the vision tower nor the resampler runs)."""

    def __init__(self, decoder: nn.Module, images: int, states: tuple[int, int], resampled: bool):
        super().__init__(decoder)
        self.images, self.states, self.resampled = images, states, resampled
        # ready image states are [B, images, tokens, d] before transformers 5.24, [B * images, ...] from it
        self.per_sample = compat.transformers_version() < IDEFICS_FLAT_STATES_SINCE

    def forward(self, **kwargs):
        if kwargs.get("image_attention_mask") is None:
            embeds = kwargs["inputs_embeds"]
            B, L = embeds.shape[:2]
            kwargs["image_attention_mask"] = torch.zeros(B, L, self.images, dtype=torch.long, device=embeds.device)
            lead = (B, self.images) if self.per_sample else (B * self.images,)
            zeros = torch.zeros(*lead, *self.states, dtype=embeds.dtype, device=embeds.device)
            kwargs["perceiver_embeddings" if self.resampled else "image_encoder_embeddings"] = zeros
        return super().forward(**kwargs)


IDEFICS_FLAT_STATES_SINCE = (5, 24)


IDEFICS_IMAGE = ("pixel_values", "image_encoder_embeddings", "perceiver_embeddings", "image_attention_mask")


def idefics_contrast_decoder(model: nn.Module, decoder: nn.Module, recorded, after) -> nn.Module:
    states = recorded.image_states                                   # [B, images * per image, d]
    images = recorded.decoder_kwargs["image_attention_mask"].shape[-1]
    resampled = bool(model.config.use_resampler)
    return IdeficsWithoutImage(decoder, images, (states.shape[1] // images, states.shape[2]), resampled)


def idefics_image_states(decoder: nn.Module):
    """The module whose input holds Idefics' image states after the vision path (its first gated
    cross-attention layer: ``(hidden, mask, image_hidden_states, ...)``)."""
    return decoder.gated_cross_attn_layers[0], 2


# -- the facts of each class ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CrossAttentionFacts:
    """One class of the kind.

    image_kwargs:    the text decoder's arguments that carry the image; the image-free pass hands
                     it None for each.
    samples:         ``fn(call, B, device) -> bool [B]``: the samples the image reaches.
    pixel_keys:      forward arguments holding images ``[..., H, W]`` (``blur`` transforms them).
    rerun_kwargs:    the decoder arguments a pixel re-run replaces (the states the vision path
                     makes; empty where they are made inside the decoder: the re-run then hands it
                     the transformed pixels).
    reference:       how the reference takes the image out: "arguments" (the forward without
                     ``reference_arguments``), "decoder" (its decoder handed None for each
                     ``image_kwargs``), "zero_mask" (``image_attention_mask`` all zero).
    decoder_and_head, between, contrast_decoder: where the decoder and head are, the module
                     between them, and a wrapper giving the decoder its own "no image" (Idefics).
    """

    family: str
    key: str
    class_name: str
    since: tuple[int, int]
    image_kwargs: tuple[str, ...]
    samples: Callable[[dict, int, object], torch.Tensor]
    pixel_keys: tuple[str, ...]
    rerun_kwargs: tuple[str, ...]
    reference: str
    reference_arguments: tuple[str, ...] = ()
    decoder_and_head: Callable = compat.vlm_decoder_and_head
    between: Callable | None = None
    contrast_decoder: Callable | None = None
    how: str = "cross-attention layers"


FACTS: dict[str, CrossAttentionFacts] = {f.class_name: f for f in (
    CrossAttentionFacts(
        "Mllama", "mllama", "MllamaForConditionalGeneration", (4, 45),
        image_kwargs=("cross_attention_states", "cross_attention_mask", "full_text_row_masked_out_mask"),
        samples=mllama_samples, pixel_keys=("pixel_values",), rerun_kwargs=("cross_attention_states",),
        reference="arguments",
        reference_arguments=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask",
                             "cross_attention_states"),
        how="the cross-attention layers of its text decoder (cross_attention_states)"),
    CrossAttentionFacts(
        "BLIP", "blip", "BlipForConditionalGeneration", (4, 45),
        image_kwargs=("encoder_hidden_states", "encoder_attention_mask"), samples=every_sample,
        pixel_keys=("pixel_values",), rerun_kwargs=("encoder_hidden_states",), reference="decoder",
        decoder_and_head=blip_decoder_and_head, between=blip_between,
        how="the cross-attention of its text decoder (encoder_hidden_states)"),
    CrossAttentionFacts(
        "Idefics", "idefics", "IdeficsForVisionText2Text", (4, 45),
        image_kwargs=IDEFICS_IMAGE, samples=idefics_samples, pixel_keys=("pixel_values",),
        rerun_kwargs=(), reference="zero_mask", contrast_decoder=idefics_contrast_decoder,
        how="the gated cross-attention layers of its decoder (image_attention_mask)"),
)}


def facts_of(model: nn.Module) -> CrossAttentionFacts:
    return compat.facts_row(model, FACTS, "cross-attention")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return facts_of(model).decoder_and_head(model)


# -- the main pass -----------------------------------------------------------------------------------------
def _no_image(samples: torch.Tensor, names: tuple[str, ...]) -> dict:
    """`MainPass.image_free`: the decoder's image arguments, each None (for any samples)."""
    return {name: None for name in names}


def _rerun(transform, original_forward, decoder, call: dict, facts: CrossAttentionFacts) -> dict:
    """`MainPass.rerun_with_pixels`: the model's own vision path on transformed pixels, up to the
    decoder call; the states it hands the decoder (no grad). A decoder that runs the vision path
    itself (Idefics) is handed the transformed pixels."""
    changed = {k: transform_pixels(v, transform) if k in facts.pixel_keys else v for k, v in call.items()}
    if not facts.rerun_kwargs:
        return {k: changed[k] for k in facts.pixel_keys if k in changed}
    return decoder_inputs_with(original_forward, decoder, changed, facts.rerun_kwargs)


def _image_states(decoder: nn.Module, facts: CrossAttentionFacts):
    """A recorder of the image states inside the decoder (Idefics), or None."""
    if facts.contrast_decoder is None:
        return None
    module, index = idefics_image_states(decoder)
    seen: dict = {}

    def pre_hook(mod, args, kwargs):
        if "states" not in seen:
            seen["states"] = args[index] if len(args) > index else kwargs.get("image_hidden_states")

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True), seen


def cross_attention_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    facts = facts_of(model)
    labels = call.pop("labels")
    compat.check_full_logits(call)
    decoder, head = facts.decoder_and_head(model)
    call = text_decoder.without_cache(model, call)
    states = _image_states(decoder, facts)
    try:
        recorded = text_decoder.run_recorded(original_forward, call, decoder, head)
    finally:
        if states is not None:
            states[0].remove()
    recorded.image_states = None if states is None else states[1].get("states")
    logits = text_decoder.logits_of(recorded.output)
    between = facts.between(model) if facts.between is not None else None
    after, transform = text_decoder.head_map(model, recorded, logits, between)
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
    contrast = (facts.contrast_decoder(model, decoder, recorded, after) if facts.contrast_decoder is not None
                else text_decoder.contrast_decoder(decoder, after))
    return MainPass(
        output=recorded.output, logits=logits, labels=labels,
        decoder=contrast, lm_head=text_decoder.contrast_head(head), decoder_kwargs=kwargs,
        visual_mask=torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device),
        attention_mask=text_decoder.padding_mask(kwargs, embeds),
        position_ids=text_decoder.positions(kwargs, embeds, recorded.layer_positions),
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
    facts.decoder_and_head(model)
    smoothing = getattr(compat.text_config(model.config), "label_smoothing", 0.0)
    if smoothing:
        warn_once(f"smoothing:{type(model).__name__}", SMOOTHING.format(cls=type(model).__name__, value=smoothing),
                  UserWarning, stacklevel=5)


def refuses_contrast(model: nn.Module, contrast: str) -> str | None:
    if contrast == "patch_mask":
        return NO_POSITIONS.format(how=facts_of(model).how)
    return None


def reference_pass(model: nn.Module, batch: dict) -> ReferencePass:
    """The reference's image-free forward: the model's own without the image's arguments, with its
    decoder handed no image states, or with an all-zero image attention mask (`CrossAttentionFacts`)."""
    facts = facts_of(model)
    ids = batch["input_ids"]
    samples = facts.samples(batch, ids.shape[0], ids.device)
    if facts.reference == "arguments":
        return ReferencePass(without_arguments(batch, facts.reference_arguments), samples)
    if facts.reference == "decoder":
        decoder = facts.decoder_and_head(model)[0]
        return ReferencePass(batch, samples, ((decoder, drop_arguments_hook(facts.image_kwargs)),))
    return ReferencePass(dict(batch, image_attention_mask=torch.zeros_like(batch["image_attention_mask"])),
                         samples)


PROVEN = {name: (f.family, f.key, KIND) for name, f in FACTS.items()}


def refuses_decoding(model: nn.Module) -> str:
    """`Integration.decoding_refusal`: contrastive decoding's image-blind branch is the decoder
    sequence without its image positions, appended to ``generate()``'s cache; this kind has no
    such positions, and a branch whose cross-attention layers get no image is not built."""
    return (f"its text decoder reaches the image only through cross-attention layers (its image "
            f"arguments: {', '.join(facts_of(model).image_kwargs)}), never at positions of its sequence, and "
            "calplug's contrastive decoding builds its image-blind branch by leaving image "
            "positions out of the decoder's sequence and cache (a branch whose cross-attention "
            "layers get no image is not built)")


def support_status(model_or_class) -> tuple[str, str] | None:
    return text_decoder.status_of(model_or_class, PROVEN, {})


INTEGRATIONS = [
    Integration(name=f"transformers-{facts.key}", model_classes=(facts.class_name,), main_pass=MainPassOf(),
                decoder_and_head=decoder_and_head, check=check,
                pixel_contrasts=bool(facts.pixel_keys), contrast_refusal=refuses_contrast,
                support_status=support_status, reference_pass=reference_pass,
                decoding_refusal=refuses_decoding)
    for facts in FACTS.values()
]


@hookimpl
def calplug_integrations():
    return INTEGRATIONS
