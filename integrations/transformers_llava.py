"""transformers' Llava, LlavaNext, LlavaNextVideo and LlavaOnevision: image (and, for
LlavaNextVideo and LlavaOnevision, video) positions are the placeholder-token ids in ``input_ids``.

The original forward runs without labels (so it computes no loss of its own); a pre-hook on the
decoder records the merged embeddings, mask and positions it received; the contrast pass reuses
them. Llava-type decoders get ``position_ids=None`` from the outer forward and then use 0..L-1.
"""
from __future__ import annotations

import torch
from torch import nn

from calplug.errors import CALInputError
from calplug.hookspecs import hookimpl
from calplug.hookspecs import MainPass

from . import compat
from .capture import arange_positions, capture_decoder_call, explicit_attention_mask, pixel_rerun


def check_labels(visual: torch.Tensor, labels: torch.Tensor) -> None:
    """``visual``: the ``[B, L]`` visual positions of the input sequence (`compat.visual_positions`)."""
    if labels.shape != visual.shape:
        raise CALInputError(
            f"labels of shape {tuple(labels.shape)} do not match input_ids of shape "
            f"{tuple(visual.shape)}: pass labels as [batch, seq_len] aligned with input_ids "
            "(-100 where no loss is wanted)"
        )


def check_pixels(visual: torch.Tensor, call: dict, pixel_keys: tuple[str, ...]) -> None:
    if bool(visual.any()) and all(call.get(k) is None for k in pixel_keys):
        raise CALInputError(
            f"input_ids hold {int(visual.sum())} image placeholder tokens but no "
            f"{' / '.join(pixel_keys)} was given: pass the pixels, or remove the placeholders"
        )


# Forward arguments that carry images as [..., 3, H, W] tensors (pixel contrasts transform them).
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def llava_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    labels = call.pop("labels")
    visual = compat.visual_positions(model.config, call)
    check_labels(visual, labels)
    compat.check_full_logits(call)
    if call.get("input_ids") is not None:  # pre-merged inputs_embeds carry their images
        check_pixels(visual, call, ("pixel_values", "pixel_values_videos", "mm_encoder_outputs"))
    decoder, lm_head = compat.llava_type_decoder_and_head(model)
    with capture_decoder_call(decoder) as decoder_kwargs:
        output = original_forward(**call)
    logits = output[0] if isinstance(output, tuple) else output.logits
    embeds = decoder_kwargs["inputs_embeds"]
    positions = decoder_kwargs.get("position_ids")
    return MainPass(
        output=output, logits=logits, labels=labels, decoder=decoder, lm_head=lm_head,
        decoder_kwargs=decoder_kwargs, visual_mask=visual,
        attention_mask=explicit_attention_mask(decoder_kwargs.get("attention_mask"), embeds),
        position_ids=arange_positions(embeds) if positions is None else positions,
        contrast_embeds=pixel_rerun(original_forward, decoder, call, PIXEL_KEYS),
    )


LLAVA = compat.family_integration(
    "Llava", "transformers-llava", llava_main_pass,
    compat.llava_type_decoder_and_head, pixel_contrasts=True)

# LlavaNext: anyres tiles, pixel_values [B, tiles, 3, H, W] plus image_sizes; the model's own
# forward packs the tiles, so the integration only reads placeholders and the decoder call.
LLAVA_NEXT = compat.family_integration(
    "LlavaNext", "transformers-llava-next", llava_main_pass,
    compat.llava_type_decoder_and_head, pixel_contrasts=True)

# LlavaNextVideo: LlavaNext images plus videos as pixel_values_videos [B, frames, 3, H, W], each
# frame's features pooled by the model's spatial pooler; video placeholders are visual positions.
LLAVA_NEXT_VIDEO = compat.family_integration(
    "LlavaNextVideo", "transformers-llava-next-video", llava_main_pass,
    compat.llava_type_decoder_and_head, pixel_contrasts=True)

# LlavaOnevision: images as LlavaNext, videos as pixel_values_videos [B, frames, 3, H, W];
# video placeholder positions count as visual positions.
LLAVA_ONEVISION = compat.family_integration(
    "LlavaOnevision", "transformers-llava-onevision", llava_main_pass,
    compat.llava_type_decoder_and_head, pixel_contrasts=True)


@hookimpl
def calplug_integrations():
    return [LLAVA, LLAVA_NEXT, LLAVA_NEXT_VIDEO, LLAVA_ONEVISION]
