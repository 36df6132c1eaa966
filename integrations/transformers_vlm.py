"""One integration for every transformers VLM that splices image (and video) features into its
decoder's input embeddings at placeholder token ids: the Llava and Qwen-VL types, Gemma 3,
InternVL, Idefics, PaliGemma, GLM-4V, Qwen3.5, Llama 4, ... (the rows of
`integrations/families.py`), and, with a one-time warning naming ``calplug verify``, any other
``*ForConditionalGeneration`` class whose config sets an image placeholder id.

The main pass runs the model's own forward without labels (so it computes no loss of its own)
while a forward pre-hook on the text decoder records exactly what the model handed it: merged
embeddings, the mask (2-D padding mask, or the 4-D / per-layer-type masks of models with
bidirectional image or prefix attention), positions (1-D, M-RoPE, GLM's, whatever the model
computed), and extra inputs. The contrast pass re-runs only the decoder on those records;
nothing is recomputed and no upstream code is copied. What differs between families is data
(`families.FamilyFacts`):

* visual positions: the placeholder ids the row names (``image_patch_id`` for Molmo2; GLM-4V
  writes video frames with the image token); a call with pre-merged ``inputs_embeds`` and no
  ``input_ids`` (ms-swift's Qwen-VL templates merge the images in a forward pre-hook) gives them
  as ``mm_token_type_ids`` or as an adapter's explicit mask (`compat.visual_positions`);
* ``visual_extras`` (Qwen3-VL deepstack): cleared by ``drop``;
* ``router_aux``: the MoE load-balancing term the model adds when given labels, kept as
  `MainPass.extra_loss` (the main pass runs without labels, so the model leaves it out);
* ``logit_transform``: what the forward does to ``lm_head``'s output (scaling, soft-capping, a
  cut vocabulary), handed to the engine as `MainPass.logit_transform` so the contrast side's
  target logit gets it too; a transform no row declares is caught by the engine's self-check;
* ``holes_ignored``: decoders with convolution or linear-attention layers that do not honour
  holes in the mask (Lfm2-VL, Qwen3.5): ``mask`` / ``patch_mask`` are refused at enable;
* ``labels_in_main_pass_below``: PaliGemma before 5.0 builds its prefix-LM mask from ``labels``,
  so the main pass passes them (the model's own loss is then computed and discarded), unless
  no label is supervised (contrastive decoding's main pass, which is generate()'s call);
* ``broken``: releases whose forward is broken upstream (Llama 4 on 5.24.0), refused at enable.

Found from the captured call, for every family alike: sequence-aligned decoder inputs (Gemma's
``per_layer_inputs``) that ``drop`` gathers with the embeddings (`MainPass.sequence_kwargs`), and
the sliding-window / chunked-attention span of the decoder (`MainPass.attention_span`; ``drop``
falls back to ``mask`` on longer sequences when the decoder builds its local masks from a 2-D
mask, and contrastive decoding when the generated sequence will outgrow it). Decoders
handed ready 4-D masks (PaliGemma, Molmo2) or per-layer-type mask dicts (Gemma 3, Gemma 4) get
those masks back in the contrast pass, image key columns hidden (``mask``) or sliced to the kept
positions (``drop``): every text row sees no image position, bidirectional blocks included.

Refused classes (`families.REFUSED`) and classes the generic rule does not accept are matched
here too, so that `calplug.enable` raises the reason rather than "no integration".
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types

import torch
from torch import nn

from calplug.classes import class_names, first_named, is_named
from calplug.contrast import NON_SEQUENCE_DECODER_KWARGS, SEQUENCE_DECODER_KWARGS
from calplug.errors import CALInputError, UnsupportedModelError, warn_once
from calplug.hookspecs import Integration, MainPass, hookimpl
from calplug.inputs import image_keys

from . import compat, families
from .capture import arange_positions, capture_decoder_call, pixel_rerun
from .families import FamilyFacts

# Decoder keyword arguments the engine handles itself (never gathered as sequence inputs).
_OWN_DECODER_KWARGS = SEQUENCE_DECODER_KWARGS + NON_SEQUENCE_DECODER_KWARGS
MASK_CONTRASTS = ("mask", "patch_mask")
# For a matched class (no FamilyFacts row): decoder inputs known to carry only visual information
# (deepstack features of Qwen3-VL-like models), and text layer types that are attention layers;
# any other layer type (convolutions, linear attention, state-space layers) ignores mask holes.
KNOWN_VISUAL_EXTRAS = ("visual_pos_masks", "deepstack_visual_embeds", "deepstack_features", "vision_mask")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention")


def check_labels(visual: torch.Tensor, labels: torch.Tensor) -> None:
    """``visual``: the ``[B, L]`` visual positions of the input sequence (`compat.visual_positions`)."""
    if labels.shape != visual.shape:
        raise CALInputError(
            f"labels of shape {tuple(labels.shape)} do not match input_ids of shape "
            f"{tuple(visual.shape)}: pass labels as [batch, seq_len] aligned with input_ids "
            "(-100 where no loss is wanted)"
        )


def check_pixels(visual: torch.Tensor, call: dict) -> None:
    """Placeholders without any visual input would be spliced with nothing (the model raises, or
    worse, trains on placeholder embeddings)."""
    given = [k for k in image_keys(call) if call[k] is not None]
    if bool(visual.any()) and not given:
        raise CALInputError(
            f"input_ids hold {int(visual.sum())} image placeholder tokens but no pixel_values / "
            "pixel_values_videos was given: pass the pixels, or remove the placeholders"
        )


def placeholder_source(config, facts: FamilyFacts):
    """What holds the placeholder ids as attributes named ``facts.placeholders``: the config, or,
    where it has none (Chameleon, Emu3 before 4.57), its ``vocabulary_map`` entry
    (`FamilyFacts.vocabulary_placeholder`)."""
    if facts.vocabulary_placeholder and families.placeholder_attribute(config, facts.placeholders) is None:
        token = (getattr(config, "vocabulary_map", None) or {}).get(facts.vocabulary_placeholder)
        if isinstance(token, int):
            return types.SimpleNamespace(**{facts.placeholders[0]: token})
    return config


def check_text_targets(model: nn.Module, labels: torch.Tensor, path: str) -> None:
    """Labels on discrete image tokens (`FamilyFacts.image_vocabulary`) train image generation:
    refused, naming them."""
    found = None
    for holder in (model, getattr(model, "model", None)):  # the class or its inner model holds it
        found = _attribute_path(holder, path)
        if found is not None:
            break
    if found is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no {path} (the ids of its image tokens)")
    image = torch.as_tensor(list(found), dtype=labels.dtype, device=labels.device)
    hit = torch.isin(labels, image)
    if bool(hit.any()):
        raise CALInputError(
            f"{type(model).__name__}: {int(hit.sum())} labels are image tokens (ids of its discrete "
            f"image vocabulary, e.g. {int(labels[hit][0])}): this batch trains image generation. CAL "
            "weights text tokens by how much the image raises them; a generated image token has no "
            "'same text without the image' (the image is the target), so calplug does not train "
            "them. Set those labels to -100, or train image generation without calplug "
            "(calplug.disable(model))")


def _attribute_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def router_aux_loss(model: nn.Module, call: dict, output) -> torch.Tensor | None:
    """The MoE load-balancing term a forward adds to its language-model loss when given labels,
    with its coefficient: ``text_config.router_aux_loss_coef * output.aux_loss``. It computes
    ``aux_loss`` when router logits are requested (the ``output_router_logits`` argument, or on
    5.x ``text_config.output_router_logits``) and adds it only with labels, which calplug's main
    pass does not pass: so the term is taken here. None otherwise."""
    if isinstance(output, tuple):
        requested = call.get("output_router_logits")
        if requested is None:
            requested = getattr(compat.text_config(model.config), "output_router_logits", False)
        if requested:
            raise CALInputError(
                "return_dict=False with router logits requested: calplug cannot tell the router's "
                "aux_loss from the other outputs of a tuple; call the model with return_dict=True"
            )
        return None
    aux = getattr(output, "aux_loss", None)
    if aux is None:
        return None
    return compat.text_config(model.config).router_aux_loss_coef * aux


def padding_mask(decoder_kwargs: dict, call: dict, embeds: torch.Tensor) -> torch.Tensor:
    """The ``[B, L]`` padding mask of the decoder sequence: the 2-D mask the decoder received, or,
    when it received 4-D / per-layer-type masks, the forward's own 2-D ``attention_mask``; ones
    when there is none."""
    B, L = embeds.shape[:2]
    for mask in (decoder_kwargs.get("attention_mask"), call.get("attention_mask")):
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == (B, L):
            return mask
    if isinstance(call.get("attention_mask"), torch.Tensor):
        raise CALInputError(
            f"attention_mask of shape {tuple(call['attention_mask'].shape)} does not match the "
            f"decoder sequence {B} x {L}: pass a [batch, seq_len] padding mask"
        )
    return torch.ones(B, L, dtype=torch.long, device=embeds.device)


def sequence_kwargs(decoder_kwargs: dict, embeds: torch.Tensor, extras: tuple[str, ...]) -> tuple[str, ...]:
    """Decoder inputs laid out ``[B, L, ...]`` besides the embeddings (Gemma's per-layer inputs)."""
    B, L = embeds.shape[:2]
    return tuple(k for k, v in decoder_kwargs.items()
                 if k not in _OWN_DECODER_KWARGS and k not in extras
                 and isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (B, L))


def check_call(model: nn.Module, call: dict, facts: FamilyFacts) -> None:
    """`FamilyFacts.call_refusals`: a call carrying the argument while the model's setting is on
    (Nemotron-H Omni's video pruning) is refused, naming the setting."""
    for argument, attribute, reason in facts.call_refusals:
        value = getattr(model, attribute, getattr(model.config, attribute, None))
        if call.get(argument) is not None and value:
            raise CALInputError(f"{type(model).__name__}: " + reason.format(value=value))


def vlm_main_pass(model: nn.Module, original_forward, call: dict, facts: FamilyFacts) -> MainPass:
    check_call(model, call, facts)
    labels = call.pop("labels")
    config = model.config
    visual = compat.visual_positions(placeholder_source(config, facts), call, facts.placeholders)
    check_labels(visual, labels)  # (pre-merged inputs_embeds say their positions otherwise)
    if facts.image_vocabulary:
        check_text_targets(model, labels, facts.image_vocabulary)
    compat.check_full_logits(call)
    if call.get("input_ids") is not None:  # pre-merged inputs_embeds carry their images
        check_pixels(visual, call)
    if facts.mrope:
        compat.warn_if_mrope_disabled(model, call)
    decoder, lm_head = compat.vlm_decoder_and_head(model)
    main_call = call
    below = facts.labels_in_main_pass_below
    # The model builds its attention mask from labels; a call that supervises nothing (contrastive
    # decoding's main pass: generate() passes no labels) gets the mask generate() gets.
    if below is not None and compat.transformers_version() < below and bool((labels != -100).any()):
        main_call = dict(call, labels=labels)
    with contextlib.ExitStack() as stack:
        decoder_kwargs = stack.enter_context(capture_decoder_call(decoder))
        numbered = (stack.enter_context(capture_decoder_call(decoder.get_submodule(facts.positions_from)))
                    if facts.positions_from else {})
        layers = getattr(decoder, "layers", None)
        first_layer = stack.enter_context(capture_decoder_call(layers[0])) if layers else {}
        output = original_forward(**main_call)
    if not decoder_kwargs:
        raise UnsupportedModelError(f"{type(model).__name__}'s forward never called its text decoder")
    if decoder_kwargs.get("inputs_embeds") is None and first_layer.get("hidden_states") is not None:
        # a decoder that embeds (and splices) token ids itself (Chameleon, Emu3 before 4.57): the
        # merged sequence is its first layer's input, handed to it as inputs_embeds from here on
        decoder_kwargs.update({k: None for k in image_keys(decoder_kwargs)}, input_ids=None,
                              inputs_embeds=first_layer["hidden_states"])
    if decoder_kwargs.get("position_ids") is None and numbered.get("position_ids") is not None:
        # the numbering the decoder made for itself (OPT): the contrast pass must keep it
        decoder_kwargs["position_ids"] = numbered["position_ids"]
    logits = output[0] if isinstance(output, tuple) else output.logits
    if isinstance(output, tuple) and main_call is not call:
        logits = output[1]  # (loss, logits, ...) with labels
    embeds = decoder_kwargs["inputs_embeds"]
    positions = decoder_kwargs.get("position_ids")
    if positions is None:
        positions = compat.mrope_positions(embeds) if facts.mrope else arange_positions(embeds)
    extras = facts.visual_extras if facts.key else KNOWN_VISUAL_EXTRAS
    # a matched class keeps a router term its output carries (calplug verify checks the loss)
    routed = facts.router_aux or (not facts.key and getattr(output, "aux_loss", None) is not None
                                  and hasattr(compat.text_config(config), "router_aux_loss_coef"))
    return MainPass(
        output=output, logits=logits, labels=labels, decoder=decoder, lm_head=lm_head,
        decoder_kwargs=decoder_kwargs, visual_mask=visual,
        attention_mask=padding_mask(decoder_kwargs, call, embeds), position_ids=positions,
        visual_extras=tuple(k for k in extras if decoder_kwargs.get(k) is not None),
        rerun_with_pixels=pixel_rerun(original_forward, decoder, call, facts.pixel_keys,
                                      tuple(k for k in extras if decoder_kwargs.get(k) is not None))
        if facts.pixel_keys else None,
        extra_loss=router_aux_loss(model, call, output) if routed else None,
        logit_transform=compat.logit_transform(config, facts.logit_transform),
        sequence_kwargs=sequence_kwargs(decoder_kwargs, embeds, extras),
        attention_span=compat.attention_span(config),
    )


def facts_of(model: nn.Module) -> FamilyFacts:
    """The family row of ``model``'s class (or of a transformers class it subclasses); a matched
    class without a row gets the defaults."""
    facts = first_named(model, families.FAMILIES)
    if facts is not None:
        return facts
    name = type(model).__name__
    return FamilyFacts(name, "", name, (4, 45), proven=False,
                       unproven_reason="no FamilyFacts row and no family case")


@dataclasses.dataclass(frozen=True)
class MainPassOf:
    """`Integration.main_pass` of the generic integration; a plain record (not a closure) so that
    an enabled model pickles."""

    def __call__(self, model: nn.Module, original_forward, call: dict) -> MainPass:
        return vlm_main_pass(model, original_forward, call, facts_of(model))


@dataclasses.dataclass(frozen=True)
class FamilyCheck:
    """`Integration.check`: refused classes raise their reason; the installed transformers must be
    in the family's range and not a release where its forward is broken; a class that is only
    matched (no family case proves it) is accepted with a one-time warning naming
    ``calplug verify``."""

    def __call__(self, model: nn.Module) -> None:
        refusal = _refusal(model)
        if refusal is not None:
            raise UnsupportedModelError(
                f"calplug does not support {type(model).__name__}: {refusal}")
        facts = facts_of(model)
        compat.require_release(facts.family, facts.since, facts.broken, facts.broken_below)
        if facts.key:
            _check_row_config(model, facts)
        compat.vlm_decoder_and_head(model)  # raises, naming the class, when there is none
        if facts.proven:
            return
        name = type(model).__name__
        why = f" ({facts.unproven_reason})" if facts.unproven_reason and facts.key else ""
        attr = families.placeholder_attribute(model.config, facts.placeholders) or "image_token_id"
        warn_once(f"matched:{name}", families.MATCHED_WARNING.format(cls=name, attr=attr, why=why),
                  UserWarning, stacklevel=5)


def _check_row_config(model: nn.Module, facts: FamilyFacts) -> None:
    """What a family row asks of the model's config and decoder (`FamilyFacts.config_refusals`,
    ``placeholder_fix``, ``positions_from``); raises `UnsupportedModelError` with the reason."""
    name = type(model).__name__
    for attribute, value, reason in facts.config_refusals:
        if getattr(model.config, attribute, None) == value:
            raise UnsupportedModelError(f"calplug does not support {name} with {attribute}={value!r}: "
                                        f"{reason}")
    if families.placeholder_attribute(placeholder_source(model.config, facts), facts.placeholders) is None:
        names = ", ".join(f"config.{n}" for n in facts.placeholders)
        raise UnsupportedModelError(
            f"{name}: its config sets none of {names}, so calplug cannot locate image positions in "
            f"input_ids (and the model splices no image there): "
            + (facts.placeholder_fix or "set it to the id of the processor's image token"))
    if not facts.positions_from:
        return
    decoder, _ = compat.vlm_decoder_and_head(model)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        tested = ", ".join(v for v in compat.TESTED_VERSIONS if tuple(map(int, v.split(".")[:2])) >= (4, 49))
        raise UnsupportedModelError(
            f"calplug does not support {name} on transformers "
            f"{'.'.join(map(str, compat.transformers_version()))}: its {type(decoder).__name__} "
            "takes no position_ids and numbers positions from the running sum of attention_mask, "
            "so a contrast pass that hides or removes the image would renumber the text after it. "
            f"Its decoder takes them from transformers 4.49 on (tested: {tested})")


def _refusal(model: nn.Module) -> str | None:
    for name in class_names(model):
        if name in families.REFUSED:
            return families.REFUSED[name]
        if name in families.FAMILIES:
            return None
    return families.generic_refusal(model)


def refuses_contrast(model: nn.Module, contrast: str) -> str | None:
    """`Integration.contrast_refusal`: decoders that ignore mask holes cannot run masking
    contrasts. A matched class is judged by its text ``layer_types``."""
    if contrast not in MASK_CONTRASTS:
        return None
    facts = facts_of(model)
    if facts.key:
        return facts.holes_ignored or None
    config = getattr(model, "config", None)
    types = getattr(compat.text_config(config), "layer_types", None) if config is not None else None
    other = sorted({str(t) for t in types or () if str(t) not in ATTENTION_LAYER_TYPES})
    if other:
        return families.HOLES_IGNORED.format(what=f"layers of type {', '.join(other)}",
                                             state="layer's state")
    return None


def accepts(model: nn.Module) -> bool:
    """`Integration.accepts` of the generic record: a ``*ForConditionalGeneration`` class with an
    image placeholder id, or a refused class (whose check then raises the reason)."""
    if is_named(model, families.REFUSED):
        return True
    return families.generic_refusal(model) is None


def support_status(model: nn.Module) -> tuple[str, str] | None:
    """`Integration.support_status`: the support matrix's status of the model's transformers
    class (the first in its MRO: a user's subclass counts as the class it extends)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return families.support_status(cls.__name__)
    return None


def _integration(name: str, classes: tuple[str, ...], pixel_contrasts: bool, **extra) -> Integration:
    return Integration(name=name, model_classes=classes, main_pass=MainPassOf(),
                       decoder_and_head=compat.vlm_decoder_and_head, check=FamilyCheck(),
                       pixel_contrasts=pixel_contrasts, contrast_refusal=refuses_contrast,
                       support_status=support_status, **extra)


INTEGRATIONS = [
    _integration(f"transformers-{facts.key.replace('_', '-')}", (facts.class_name,),
                 bool(facts.pixel_keys))
    for facts in families.FAMILIES.values()
]
# Matched and refused classes: consulted after every named integration (plugins.py registers this
# module first, and later-registered plugins are asked first).
GENERIC = _integration("transformers-placeholder", (), False, accepts=accepts)


@hookimpl
def calplug_integrations():
    return INTEGRATIONS + [GENERIC]
