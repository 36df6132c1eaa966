"""Step 2 of docs/cal.md: contrast conditions, i.e. how the no-grad "without the image" pass is built.

Pure tensor code over a `MainPass`. Each condition returns a `ContrastPlan`: the decoder keyword
arguments of the contrast pass, and for every main position which contrast hidden state stands
for it. The built-in conditions (``mask`` as published, ``drop`` the fast default, ``patch_mask``,
``blur``) are registered as `Contrast` records in `calplug.builtin`; how ``drop`` differs from
``mask``, row by row, is in docs/cal.md.
"""
from __future__ import annotations

import torch

from .blur import gaussian_blur
from .errors import CALInputError
from .hookspecs import ContrastPlan, MainPass

# Decoder keyword arguments that describe the cache / output format, not the sequence: the
# contrast pass drops them and runs without a cache.
NON_SEQUENCE_DECODER_KWARGS = (
    "cache", "past_key_values", "use_cache", "cache_position", "output_attentions",
    "output_hidden_states", "return_dict", "input_ids",
)


def base_decoder_kwargs(main: MainPass) -> dict:
    """The main pass's decoder arguments without cache or output-format arguments."""
    kwargs = {k: v for k, v in main.decoder_kwargs.items() if k not in NON_SEQUENCE_DECODER_KWARGS}
    kwargs["use_cache"] = False
    return kwargs


def identity_rows(B: int, L: int, device) -> torch.Tensor:
    return torch.arange(B * L, device=device).view(B, L)


def masked_attention_plan(main: MainPass, hidden: torch.Tensor) -> ContrastPlan:
    """Same sequence and positions; attention to the positions in ``hidden [B, L]`` is removed."""
    kwargs = base_decoder_kwargs(main)
    mask = main.attention_mask
    kwargs["attention_mask"] = mask * (~hidden).to(mask.dtype)
    B, L = hidden.shape
    rows = identity_rows(B, L, hidden.device)
    rows[~hidden.any(1)] = -1  # nothing hidden in this sample: its gap is 0 by definition
    return ContrastPlan(kwargs, rows)


def mask_contrast(main: MainPass, config) -> ContrastPlan | None:
    if not bool(main.visual_mask.any()):
        return None
    return masked_attention_plan(main, main.visual_mask)


def patch_mask_contrast(main: MainPass, config) -> ContrastPlan | None:
    visual = main.visual_mask
    if not bool(visual.any()) or config.mask_ratio == 0.0:
        return None
    gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
    hidden = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().squeeze(1)
        n_hide = int(round(config.mask_ratio * positions.numel()))
        if n_hide:
            chosen = torch.randperm(positions.numel(), generator=gen)[:n_hide].to(positions.device)
            hidden[b, positions[chosen]] = True
    return masked_attention_plan(main, hidden)


def blur_contrast(main: MainPass, config) -> ContrastPlan | None:
    visual = main.visual_mask
    if not bool(visual.any()):
        return None
    if main.contrast_embeds is None:
        raise CALInputError("contrast='blur' needs an integration that can re-run its vision path")
    kwargs = base_decoder_kwargs(main)
    kwargs["inputs_embeds"] = main.contrast_embeds(lambda px: gaussian_blur(px, config.blur_sigma))
    B, L = visual.shape
    rows = identity_rows(B, L, visual.device)
    rows[~visual.any(1)] = -1
    return ContrastPlan(kwargs, rows)


def select_positions(main: MainPass, keep: torch.Tensor, samples: torch.Tensor) -> ContrastPlan:
    """Plan a decoder pass over ``samples`` keeping only positions where ``keep [B, L]`` is True.

    Kept positions are packed to the left in their original order, keep their embeddings and
    position ids, and the rest of each row is padding (attention mask 0). Removed positions
    borrow the state of the last kept position before them (-1 when there is none).
    """
    B, L = keep.shape
    device = keep.device
    sub_keep = keep[samples]                                         # [S, L]
    counts = sub_keep.sum(1)
    length = max(int(counts.max()), 1)
    # Stable sort puts kept positions first, in order.
    order = torch.sort((~sub_keep).to(torch.int8), dim=1, stable=True).indices[:, :length]  # [S, L']
    kwargs = base_decoder_kwargs(main)
    for name in main.visual_extras:
        if name in kwargs:
            kwargs[name] = None
    embeds = main.inputs_embeds[samples]
    kwargs["inputs_embeds"] = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    packed_mask = torch.arange(length, device=device).unsqueeze(0) < counts.unsqueeze(1)
    kwargs["attention_mask"] = packed_mask.to(main.attention_mask.dtype)
    pos = main.position_ids
    lead = pos.shape[:-2]
    pos = pos.expand(*lead, B, L)[..., samples, :]
    kwargs["position_ids"] = pos.gather(-1, order.expand(*lead, *order.shape))
    rank = sub_keep.long().cumsum(1) - 1                             # last kept position at or before i
    sub_rows = torch.where(rank >= 0, rank + torch.arange(samples.numel(), device=device).unsqueeze(1) * length,
                           torch.full_like(rank, -1))
    rows = torch.full((B, L), -1, dtype=torch.long, device=device)
    rows[samples] = sub_rows
    return ContrastPlan(kwargs, rows)


def drop_contrast(main: MainPass, config) -> ContrastPlan | None:
    visual = main.visual_mask
    with_image = visual.any(1)
    if not bool(with_image.any()):
        return None
    keep = main.attention_mask.bool() & ~visual
    return select_positions(main, keep, with_image.nonzero().squeeze(1))


def placeholder_plan(main: MainPass) -> ContrastPlan:
    """A one-token pass over the first sample, for a rank that has nothing to contrast while other
    ranks of a sharded model do: it gathers the same decoder parameters in the same order."""
    keep = torch.zeros_like(main.visual_mask)
    keep[0, 0] = True
    plan = select_positions(main, keep, torch.zeros(1, dtype=torch.long, device=keep.device))
    plan.rows.fill_(-1)
    return plan
