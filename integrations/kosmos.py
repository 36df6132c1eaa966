"""Kosmos-2 and Kosmos-2.5: the image sits at positions of the text decoder's sequence (the
processor's ``image_embeds_position_mask``), but the splice happens inside the text model's own
embedding step: the text decoder is handed token ids, ``image_embeds`` and that mask, never
merged embeddings, so the generic placeholder integration has no decoder call to capture.

From its own modules: the text transformer takes ``inputs_embeds`` (before its embedding scale)
and ``position_ids`` as well as token ids. The main pass records its call; the contrast pass calls
it with the merged embeddings (its own token table's rows, the image embeddings it was handed at
the mask's positions), the positions its sinusoidal table used in the main pass (its own
``create_position_ids_from_input_ids``: padding-aware), and no ``image_embeds``: then the image
positions are ordinary positions of the sequence, and ``drop`` / ``mask`` / ``patch_mask`` /
``blur`` work as for every placeholder family (Kosmos-2.5's segment embeddings follow the mask,
which ``drop`` gathers with the embeddings). The reference is the placeholder families' own: the
model's forward with attention to those positions removed.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch
from torch import nn

from calplug.errors import CALInputError, UnsupportedModelError
from calplug.hookspecs import Integration, MainPass, hookimpl
from calplug.inputs import has_pixels

from . import compat, text_decoder
from .capture import decoder_inputs_with, transform_pixels

KIND = "image positions spliced inside the text model (Kosmos)"


@dataclasses.dataclass(frozen=True)
class KosmosFacts:
    family: str
    key: str
    class_name: str
    since: tuple[int, int]
    pixel_keys: tuple[str, ...]


FACTS = {f.class_name: f for f in (
    KosmosFacts("Kosmos-2", "kosmos2", "Kosmos2ForConditionalGeneration", (4, 35), ("pixel_values",)),
    # flattened patches [B, patches, 2 + C * h * w]: nothing to blur
    KosmosFacts("Kosmos-2.5", "kosmos2_5", "Kosmos2_5ForConditionalGeneration", (4, 56), ()),
)}


def facts_of(model: nn.Module) -> KosmosFacts:
    return compat.facts_row(model, FACTS, "Kosmos")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    text = getattr(model, "text_model", None)
    decoder, head = getattr(text, "model", None), getattr(text, "lm_head", None)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise UnsupportedModelError(f"cannot find the text transformer and lm_head of {type(model).__name__} "
                                    "(text_model.model, text_model.lm_head)")
    return decoder, head


def merged(decoder: nn.Module, ids: torch.Tensor, image_embeds, visual: torch.Tensor) -> torch.Tensor:
    """The embeddings the text transformer splices for itself, before its scale: its own token
    rows, with the image embeddings it was handed at the image positions (no grad)."""
    with torch.no_grad():
        embeds = text_decoder.input_table(decoder)(ids).clone()
        if image_embeds is not None and bool(visual.any()):
            rows = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
            if rows.shape[0] != int(visual.sum()):
                raise CALInputError(f"{int(visual.sum())} image positions in image_embeds_position_mask "
                                    f"for {rows.shape[0]} image embeddings")
            embeds[visual] = rows
    return embeds


def own_positions(decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The padding-aware positions the text transformer's sinusoidal table computes from token ids
    (its own ``create_position_ids_from_input_ids``: a method of the table from 5.0, a function of
    its module before)."""
    table = decoder.embed_positions
    make = getattr(table, "create_position_ids_from_input_ids", None)
    if make is None:
        make = getattr(sys.modules[type(table).__module__], "create_position_ids_from_input_ids")
    return make(ids, table.padding_idx, 0)


def _rerun(transform, original_forward, decoder, call: dict, ids, visual, pixel_keys) -> dict:
    """`MainPass.rerun_with_pixels`: the vision path on transformed pixels, spliced as the model
    would."""
    changed = {k: transform_pixels(v, transform) if k in pixel_keys else v for k, v in call.items()}
    image = decoder_inputs_with(original_forward, decoder, changed, ("image_embeds",))["image_embeds"]
    return {"inputs_embeds": merged(decoder, ids, image, visual)}


def kosmos_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    facts = facts_of(model)
    labels = call.pop("labels")
    compat.check_full_logits(call)
    decoder, head = decoder_and_head(model)
    call = text_decoder.without_cache(model, call)
    recorded = text_decoder.run_recorded(original_forward, call, decoder, head)
    logits = text_decoder.logits_of(recorded.output)
    text_decoder.head_map(model, recorded, logits)  # refuses anything between decoder and logits
    got = recorded.decoder_kwargs
    ids = got.get("input_ids")
    if ids is None:
        raise CALInputError("calplug needs input_ids (not inputs_embeds) to find Kosmos' image positions")
    mask = got.get("image_embeds_position_mask")
    visual = (torch.zeros_like(ids, dtype=torch.bool) if mask is None
              else mask.to(device=ids.device).ne(0))
    if tuple(labels.shape) != tuple(ids.shape):
        raise CALInputError(f"labels of shape {tuple(labels.shape)} do not match input_ids of shape "
                            f"{tuple(ids.shape)}")
    positions = got.get("position_ids")
    if positions is None:
        positions = own_positions(decoder, ids)
    kwargs = {k: v for k, v in got.items() if k not in ("input_ids", "image_embeds", "position_ids")}
    kwargs.update(inputs_embeds=merged(decoder, ids, got.get("image_embeds"), visual), position_ids=positions)
    rerun = None
    if facts.pixel_keys and has_pixels(call, facts.pixel_keys):
        rerun = functools.partial(_rerun, original_forward=original_forward, decoder=decoder, call=call,
                                  ids=ids, visual=visual, pixel_keys=facts.pixel_keys)
    embeds = kwargs["inputs_embeds"]
    return MainPass(
        output=recorded.output, logits=logits, labels=labels, decoder=decoder, lm_head=head,
        decoder_kwargs=kwargs, visual_mask=visual, attention_mask=text_decoder.padding_mask(kwargs, embeds),
        position_ids=positions, rerun_with_pixels=rerun,
        sequence_kwargs=("image_embeds_position_mask",) if mask is not None else ())


@dataclasses.dataclass(frozen=True)
class MainPassOf:
    """`Integration.main_pass` (a plain record, not a closure: an enabled model pickles)."""

    def __call__(self, model: nn.Module, original_forward, call: dict) -> MainPass:
        return kosmos_main_pass(model, original_forward, call)


def check(model: nn.Module) -> None:
    facts = facts_of(model)
    compat.require_release(facts.family, facts.since)
    decoder_and_head(model)


PROVEN = {name: (f.family, f.key, KIND) for name, f in FACTS.items()}

# `Integration.decoding_refusal`, per class: what stands between each and contrastive decoding.
NOT_DECODED = {
    "Kosmos2ForConditionalGeneration": (
        "its generate() runs the vision model itself and hands the prompt to its text model's own "
        "generate(), so the model's forward, which calplug's contrastive decoding wraps, never runs"),
    "Kosmos2_5ForConditionalGeneration": (
        "contrastive decoding is not built for it yet: generate() asks its forward for the last "
        "position's logits only, while this integration checks the map from the text decoder to "
        "the logits on the prompt's rows, and no decoding reference covers it"),
}


def refuses_decoding(model: nn.Module) -> str:
    return NOT_DECODED[facts_of(model).class_name]


def support_status(model_or_class) -> tuple[str, str] | None:
    return text_decoder.status_of(model_or_class, PROVEN, {})


INTEGRATIONS = [
    Integration(name=f"transformers-{f.key.replace('_', '-')}", model_classes=(f.class_name,),
                main_pass=MainPassOf(), decoder_and_head=decoder_and_head, check=check,
                pixel_contrasts=bool(f.pixel_keys), support_status=support_status,
                decoding_refusal=refuses_decoding)
    for f in FACTS.values()
]


@hookimpl
def calplug_integrations():
    return INTEGRATIONS
