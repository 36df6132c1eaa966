"""Step 2 of docs/cal.md: contrast conditions, i.e. how the no-grad "without the image" pass is built.

Pure tensor code over a `MainPass`. Each condition returns a `ContrastPlan`: the decoder keyword
arguments of the contrast pass, and for every main position which contrast hidden state stands
for it. The built-in conditions (``mask`` as published, ``drop`` the fast default, ``patch_mask``,
``blur``, and VCD's diffusion ``noise``) are registered as `Contrast` records in `calplug.builtin`; how ``drop`` differs from
``mask``, row by row, is in docs/cal.md.

What "the image" is comes from the `MainPass`: the visual positions of the decoder sequence,
the decoder inputs that carry only visual information (`MainPass.visual_extras`, cleared), and,
for models whose image enters elsewhere (cross-attention states, an encoder's output), the
integration's image-free decoder inputs (`MainPass.image_free`). Every condition contrasts the
samples the image reaches (`MainPass.with_image`); the rows of the others get no contrast value.

Decoders of some models receive ready masks instead of a 2-D padding mask: a 4-D
``[B, 1, L, L]`` mask (PaliGemma's prefix-LM, Molmo2's bidirectional image blocks) or a dict of
them per layer type (Gemma 3 / 4: full and sliding attention). The contrast pass then gets the
same masks back: ``mask`` blocks the hidden key columns in each, ``drop`` slices rows and
columns at the kept positions, so every text row sees what it saw in the main pass minus the
image, bidirectional blocks and sliding windows included.
"""
from __future__ import annotations

import warnings

import torch

from .blur import gaussian_blur
from .noise import diffuse
from .errors import CALInputError
from .hookspecs import ContrastPlan, MainPass

# Decoder keyword arguments that describe the cache / output format, not the sequence: the
# contrast pass drops them and runs without a cache.
NON_SEQUENCE_DECODER_KWARGS = (
    "cache", "past_key_values", "use_cache", "cache_position", "output_attentions",
    "output_hidden_states", "return_dict", "input_ids",
)
# The sequence arguments every contrast handles itself (never gathered as other sequence inputs).
SEQUENCE_DECODER_KWARGS = ("inputs_embeds", "attention_mask", "position_ids")


def base_decoder_kwargs(main: MainPass) -> dict:
    """The main pass's decoder arguments without cache or output-format arguments."""
    kwargs = {k: v for k, v in main.decoder_kwargs.items() if k not in NON_SEQUENCE_DECODER_KWARGS}
    kwargs["use_cache"] = False
    return kwargs


def without_image(main: MainPass, kwargs: dict, samples: torch.Tensor | None,
                  removed: bool = True) -> dict:
    """``kwargs`` (decoder arguments of ``samples``, long ``[S]``, or of every sample when None)
    with what carries the image besides its positions taken away: the integration's image-free
    inputs (`MainPass.image_free`) put in and, when the image positions were ``removed`` from the
    sequence, the inputs that only describe them (`MainPass.visual_extras`) cleared. A pass that
    keeps the positions (masking) keeps those inputs: the image rows are computed as published."""
    for name in main.visual_extras if removed else ():
        if name in kwargs:
            kwargs[name] = None
    if main.image_free is not None:
        if samples is None:
            samples = torch.arange(main.visual_mask.shape[0], device=main.visual_mask.device)
        kwargs.update(main.image_free(samples))
    return kwargs


def has_image(main: MainPass) -> bool:
    """Whether the micro-batch has anything to contrast (one host synchronisation)."""
    return bool(main.with_image.any())


def identity_rows(B: int, L: int, device) -> torch.Tensor:
    return torch.arange(B * L, device=device).view(B, L)


# -- ready (4-D / per-layer-type) masks -----------------------------------------------------------
def is_ready_mask(mask) -> bool:
    """A 4-D mask, or a dict of them per layer type, as some decoders receive instead of 2-D."""
    return isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


# Per-layer-type entries that are not attention masks but the [B, L] padding mask (or None: no
# padding) of layers without attention (transformers' recurrent masks: linear attention, short
# convolutions), e.g. Inkling's dict, built before its decoder is called.
PADDING_MASK_TYPES = ("linear_attention", "conv")


def map_ready_mask(mask, fn, padding_fn=None):
    """``fn`` on each 4-D mask of ``mask`` (one, or a dict per layer type); ``padding_fn`` on the
    dict's `PADDING_MASK_TYPES` entries (kept as they are when it is None)."""
    if not isinstance(mask, dict):
        return fn(mask)
    return {k: (v if padding_fn is None else padding_fn(v)) if k in PADDING_MASK_TYPES else fn(v)
            for k, v in mask.items()}


def _allowed(mask: torch.Tensor | None, padding: torch.Tensor) -> torch.Tensor:
    """bool ``[B, h, L, L]``: which key each query may attend to. Boolean masks are that already;
    additive float masks allow where they are not (close to) the dtype's minimum. A ``None`` entry
    (a layer type whose mask the model left to the kernel: plain causal) becomes causal over the
    non-padding keys."""
    if mask is None:
        B, L = padding.shape
        causal = torch.ones(L, L, dtype=torch.bool, device=padding.device).tril()
        return causal.view(1, 1, L, L) & padding.bool().view(B, 1, 1, L)
    if mask.dim() != 4:
        raise CALInputError(
            f"the decoder received per-layer-type masks of shape {tuple(mask.shape)} (not 4-D "
            "[B, 1, L, L]), as some attention kernels (flash attention) take them; calplug's "
            "contrast for this model edits 4-D masks: load it with attn_implementation='sdpa' "
            "or 'eager'"
        )
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _like(allowed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``allowed`` in the representation of ``mask`` (bool, or additive 0 / dtype minimum)."""
    if mask is None or mask.dtype == torch.bool:
        return allowed
    blocked = torch.full_like(mask[:1, :1, :1, :1], torch.finfo(mask.dtype).min)
    return torch.where(allowed, torch.zeros_like(blocked), blocked)


def hide_keys(mask: torch.Tensor | None, hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``mask`` with the key columns at ``hidden [B, L]`` blocked. A query row left with no key at
    all (an image at the very start) keeps its own position, so that no row is all-blocked (a
    kernel would return NaN there); rows that were all-blocked already stay as they were."""
    allowed = _allowed(mask, padding)
    B, L = hidden.shape
    allowed = allowed.expand(B, *allowed.shape[1:])
    kept = allowed & ~hidden.view(B, 1, 1, L)
    emptied = ~kept.any(-1, keepdim=True) & allowed.any(-1, keepdim=True)
    eye = torch.eye(L, dtype=torch.bool, device=hidden.device).view(1, 1, L, L)
    return _like(kept | (emptied & eye), mask)


def slice_ready_mask(mask: torch.Tensor | None, samples: torch.Tensor, order: torch.Tensor,
                     valid: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Rows and columns of ``mask`` at the kept positions ``order [S, L']`` of ``samples``; slots
    beyond a sample's length (``valid`` False) are padding: blocked as keys, and as queries they
    see only themselves (no all-blocked row)."""
    allowed = _allowed(mask, padding)
    B = padding.shape[0]
    allowed = allowed.expand(B, *allowed.shape[1:])[samples]               # [S, h, L, L]
    S, h, L, _ = allowed.shape
    n = order.shape[1]
    rows = allowed.gather(2, order.view(S, 1, n, 1).expand(S, h, n, L))
    sub = rows.gather(3, order.view(S, 1, 1, n).expand(S, h, n, n))       # [S, h, L', L']
    sub = sub & valid.view(S, 1, 1, n) & valid.view(S, 1, n, 1)
    eye = torch.eye(n, dtype=torch.bool, device=order.device).view(1, 1, n, n)
    sub = sub | (eye & ~valid.view(S, 1, n, 1))
    return _like(sub, mask)


def masked_attention_plan(main: MainPass, hidden: torch.Tensor,
                          contrasted: torch.Tensor | None = None) -> ContrastPlan:
    """Same sequence and positions; attention to the positions in ``hidden [B, L]`` is removed
    (and the image's other inputs, `without_image`). Samples where ``contrasted [B]`` is False
    (default: those with no hidden position) get no contrast value."""
    kwargs = without_image(main, base_decoder_kwargs(main), None, removed=False)
    ready = kwargs.get("attention_mask")
    mask = main.attention_mask
    keys = mask * (~hidden).to(mask.dtype)
    if is_ready_mask(ready):
        kwargs["attention_mask"] = map_ready_mask(ready, lambda m: hide_keys(m, hidden, main.attention_mask),
                                                  lambda m: keys)
    else:
        kwargs["attention_mask"] = keys
    B, L = hidden.shape
    rows = identity_rows(B, L, hidden.device)
    contrasted = hidden.any(1) if contrasted is None else contrasted
    rows[~contrasted] = -1  # nothing taken away in this sample: its gap is 0 by definition
    return ContrastPlan(kwargs, rows, keys=keys)


def mask_contrast(main: MainPass, config) -> ContrastPlan | None:
    if not has_image(main):
        return None
    return masked_attention_plan(main, main.visual_mask, main.with_image)


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


def pixel_plan(main: MainPass, transform, name: str) -> ContrastPlan | None:
    """The main pass's decoder call with the inputs its vision path makes from
    ``transform(pixels)`` (`MainPass.rerun_with_pixels`): the sequence and positions unchanged."""
    if not has_image(main):
        return None
    if main.rerun_with_pixels is None:
        raise CALInputError(f"contrast={name!r} needs an integration that can re-run its vision path")
    kwargs = base_decoder_kwargs(main)
    kwargs.update(main.rerun_with_pixels(transform))
    B, L = main.visual_mask.shape
    rows = identity_rows(B, L, main.visual_mask.device)
    rows[~main.with_image] = -1
    return ContrastPlan(kwargs, rows, keys=main.attention_mask)


def blur_contrast(main: MainPass, config) -> ContrastPlan | None:
    return pixel_plan(main, lambda px: gaussian_blur(px, config.blur_sigma), "blur")


def noise_contrast(main: MainPass, config) -> ContrastPlan | None:
    """VCD's contrast: the image after ``config.noise_step`` steps of forward diffusion
    (`calplug.noise`), the noise drawn from ``config.seed``."""
    generator = torch.Generator(device="cpu").manual_seed(int(config.seed))
    return pixel_plan(main, lambda px: diffuse(px, config.noise_step, generator), "noise")


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
    for name in ("inputs_embeds",) + tuple(main.sequence_kwargs):
        seq = kwargs[name][samples]
        index = order.view(*order.shape, *([1] * (seq.dim() - 2)))
        kwargs[name] = seq.gather(1, index.expand(*order.shape, *seq.shape[2:]))
    packed_mask = torch.arange(length, device=device).unsqueeze(0) < counts.unsqueeze(1)
    ready = kwargs.get("attention_mask")
    if is_ready_mask(ready):
        kwargs["attention_mask"] = map_ready_mask(
            ready, lambda m: slice_ready_mask(m, samples, order, packed_mask, main.attention_mask),
            lambda m: packed_mask.to(main.attention_mask.dtype))
    else:
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
    return ContrastPlan(without_image(main, kwargs, samples), rows, samples=samples,
                        keys=packed_mask.to(main.attention_mask.dtype))


DROP_SPAN_WARNING = (
    "contrast='drop': this micro-batch's sequences ({length} positions) are longer than the "
    "decoder's sliding window / attention chunk ({span}), which its layers count in sequence "
    "indices; removing the image positions would bring earlier text into a window, so drop would "
    "not equal mask. This micro-batch (and any other that long) uses the mask contrast instead "
    "(the published one; slower). Use contrast='mask' to silence this."
)


def drop_contrast(main: MainPass, config) -> ContrastPlan | None:
    visual = main.visual_mask
    with_image = main.with_image
    if not bool(with_image.any()):
        return None
    span = main.attention_span
    # a decoder handed ready masks gets them sliced: its windows then stay as they were
    if span is not None and visual.shape[1] > span and not is_ready_mask(main.decoder_kwargs.get("attention_mask")):
        warnings.warn(DROP_SPAN_WARNING.format(length=visual.shape[1], span=span), UserWarning,
                      stacklevel=2)
        return mask_contrast(main, config)
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
