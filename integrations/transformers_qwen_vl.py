"""transformers' Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: image and video placeholders,
M-RoPE positions.

Visual positions are the ``image_token_id`` and ``video_token_id`` placeholders in ``input_ids``
(``vision_start`` / ``vision_end`` are text). A call with pre-merged ``inputs_embeds`` and no
``input_ids`` (ms-swift's Qwen-VL templates merge the images in a forward pre-hook) gives them as
``mm_token_type_ids`` (transformers >= 5.3) or as an adapter's explicit mask
(`compat.visual_positions`). The original forward runs without labels; a pre-hook
on the decoder records what the model handed it, in particular the 3-D rotary positions
(``[3, B, L]``, or ``[4, B, L]`` with text positions first) the model computed for the whole
multimodal sequence. The contrast pass reuses them: in ``drop`` mode every kept text token keeps
its original 3-D position, so nothing is recomputed for the shortened sequence.

Qwen3-VL also hands the decoder ``visual_pos_masks`` and ``deepstack_visual_embeds`` (visual
features added to early decoder layers at the visual positions). They are declared as
`MainPass.visual_extras`: ``drop`` removes the visual positions and clears them; ``mask`` and
``patch_mask`` keep the sequence, so they keep them too (no text row can attend to a hidden
visual position, whatever is added there).

Qwen3-VL-MoE adds its router's load-balancing loss to the language-model loss when router logits
are requested; the main pass runs without labels, so the model leaves it out and the term is kept
as `MainPass.extra_loss` (CAL loss + ``router_aux_loss_coef * aux_loss``, as the model would).
The contrast pass needs no router term: it only reads target logits.

Pixel-level contrasts (``blur``) are not offered: Qwen's ``pixel_values`` are already cut into
flattened patches, not images.
"""
from __future__ import annotations

import torch
from torch import nn

from calplug.errors import CALInputError
from calplug.hookspecs import hookimpl
from calplug.hookspecs import MainPass

from . import compat
from .capture import capture_decoder_call, explicit_attention_mask
from .transformers_llava import check_labels, check_pixels

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
QWEN3_VISUAL_EXTRAS = ("visual_pos_masks", "deepstack_visual_embeds")


def router_aux_loss(model: nn.Module, call: dict, output) -> torch.Tensor | None:
    """The MoE load-balancing term a Qwen-VL MoE forward adds to its language-model loss, with its
    coefficient: ``text_config.router_aux_loss_coef * output.aux_loss``. Its forward computes
    ``aux_loss`` when router logits are requested (5.x: ``output_router_logits`` argument or
    ``text_config.output_router_logits``; 4.57: only the argument) and adds it only when given
    labels, which calplug's main pass does not pass: so the term is taken here. None otherwise."""
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


def qwen_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    labels = call.pop("labels")
    visual = compat.visual_positions(model.config, call)
    check_labels(visual, labels)
    compat.check_full_logits(call)
    if call.get("input_ids") is not None:  # pre-merged inputs_embeds carry their images
        check_pixels(visual, call, PIXEL_KEYS)
    compat.warn_if_mrope_disabled(model, call)
    decoder, lm_head = compat.qwen_type_decoder_and_head(model)
    with capture_decoder_call(decoder) as decoder_kwargs:
        output = original_forward(**call)
    logits = output[0] if isinstance(output, tuple) else output.logits
    embeds = decoder_kwargs["inputs_embeds"]
    return MainPass(
        output=output, logits=logits, labels=labels, decoder=decoder, lm_head=lm_head,
        decoder_kwargs=decoder_kwargs, visual_mask=visual,
        attention_mask=explicit_attention_mask(decoder_kwargs.get("attention_mask"), embeds),
        position_ids=compat.qwen_positions(decoder_kwargs.get("position_ids"), embeds),
        visual_extras=tuple(k for k in QWEN3_VISUAL_EXTRAS if decoder_kwargs.get(k) is not None),
        extra_loss=router_aux_loss(model, call, output),
    )


QWEN2_VL = compat.family_integration(
    "Qwen2-VL", "transformers-qwen2-vl", qwen_main_pass,
    compat.qwen_type_decoder_and_head)
QWEN2_5_VL = compat.family_integration(
    "Qwen2.5-VL", "transformers-qwen2.5-vl", qwen_main_pass,
    compat.qwen_type_decoder_and_head)
QWEN3_VL = compat.family_integration(
    "Qwen3-VL", "transformers-qwen3-vl", qwen_main_pass,
    compat.qwen_type_decoder_and_head)
QWEN3_VL_MOE = compat.family_integration(
    "Qwen3-VL-MoE", "transformers-qwen3-vl-moe", qwen_main_pass,
    compat.qwen_type_decoder_and_head)


@hookimpl
def calplug_integrations():
    return [QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE]
