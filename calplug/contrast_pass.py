"""Steps 2 and 4 of docs/cal.md for every caller: the image-blind (contrast) pass of a main pass,
and how much the image raised each target token.

One machinery for training and inference. `calplug.step` calls `measure` inside every CAL
training step; `calplug.scoring.token_gaps` (``calplug.token_gaps``) calls it on any batch, for
``calplug inspect``, ``calplug verify``, the dataset audit and contrastive decoding. Nothing here
knows a model family: the integration's `MainPass` says what the image is, a `Contrast` builds the
pass (`calplug.contrast`), and the target logits come from the decoder's final hidden states and
the head's rows (`calplug.gap`), never from vocabulary-sized logits.

Sharded training (ZeRO-3, FSDP) adds one rule, `plan`'s agreement: every rank runs the same
modules, or the ranks' collective parameter gathers pair up wrongly (a crash or a hang).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from . import distributed, gap, plugins
from .config import CALConfig
from .contrast import has_image, placeholder_plan
from .errors import CALInputError
from .hookspecs import Contrast, ContrastPlan, MainPass


def plan(model: nn.Module, main: MainPass, config: CALConfig, contrast: Contrast) -> ContrastPlan | None:
    """This rank's contrast plan; under ZeRO-3 / FSDP, one that runs the same modules on every rank.

    A rank with nothing to contrast would skip the contrast pass while others run it. Plain
    contrasts (drop, mask, patch_mask) build their plan without running any module, so ranks agree
    after building: a rank without a plan runs a one-token placeholder through the decoder. A
    contrast that re-runs the vision tower on transformed pixels (``needs_pixels``: blur) runs
    modules while building, so ranks agree before: a rank whose micro-batch has pixels but no
    image (the LLaVA codebases' dummy images) re-runs its vision path unchanged, and a rank with no
    pixels at all cannot, which is an error on every rank at once rather than a hang.
    """
    if not (contrast.needs_pixels and distributed.must_agree(model)):
        built = contrast.build(main, config)
        if distributed.any_rank(built is not None, model) and built is None:
            built = placeholder_plan(main)
        return built
    visual = has_image(main)
    can_rerun = main.rerun_with_pixels is not None  # set only when this micro-batch has pixels
    any_visual, any_without_pixels = distributed.any_rank_each([visual, not can_rerun], model)
    if not any_visual:
        return None
    if any_without_pixels:
        raise CALInputError(
            f"contrast={config.contrast!r} re-runs the vision tower in the contrast pass, and under "
            "DeepSpeed ZeRO-3 / FSDP every rank must then run it, but at least one rank's "
            "micro-batch has no pixel values. Give text-only micro-batches a dummy image (as the "
            "LLaVA codebases do), or use contrast='drop', 'mask' or 'patch_mask'"
        )
    if not visual:
        main.rerun_with_pixels(lambda pixels: pixels)  # the same vision-tower gathers as the others
        return placeholder_plan(main)
    built = contrast.build(main, config)
    return placeholder_plan(main) if built is None else built


def contrast_states(main: MainPass, built: ContrastPlan) -> torch.Tensor:
    """The flattened ``[B' * L', d]`` final hidden states of the no-grad decoder call ``built``."""
    with _no_gradient_checkpointing(main.decoder):
        out = main.decoder(**built.decoder_kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def target_gaps(main: MainPass, built: ContrastPlan | None, main_logits: torch.Tensor,
                targets: torch.Tensor, *, log_softmax: bool = False):
    """Run the contrast pass ``built`` (no grad). Returns float32 ``[B, L-1]`` gaps ``main -
    contrast`` of each row's target logit (0 on rows without a contrast value), bool ``[B, L-1]``
    (which rows had one) and, with ``log_softmax``, the contrast side's float32 log-sum-exp over
    the vocabulary per row (None otherwise; the main side's where there was no contrast). The
    contrast side never makes vocabulary-sized logits for more than a chunk of rows at a time."""
    has = torch.zeros_like(main_logits, dtype=torch.bool) if built is None else built.rows[:, :-1] >= 0
    if built is None:
        return torch.zeros_like(main_logits), has, None
    hidden = contrast_states(main, built)
    rows = built.rows[:, :-1]
    bias = getattr(main.lm_head, "bias", None)
    lse = None
    with distributed.gathered(main.lm_head):
        contrast = gap.hidden_target_logits(hidden, main.lm_head.weight, bias, targets[has],
                                            rows=rows[has])
        if main.logit_transform is not None:  # the model's logits are transformed: so are these
            contrast = main.logit_transform(contrast)
        if log_softmax:
            lse = torch.zeros_like(main_logits)
            lse[has] = gap.hidden_lse(hidden, main.lm_head.weight, bias, rows[has], main.logit_transform)
    return gap.target_gap(main_logits, targets, contrast, has), has, lse


def measure(model: nn.Module, main: MainPass, config: CALConfig, contrast: Contrast,
            main_logits: torch.Tensor, targets: torch.Tensor, *, log_softmax: bool = False):
    """`plan` and `target_gaps` as one observed contrast pass (`calplug_observe_contrast_pass`
    is called around it; FSDP2's backward prefetch is kept out of it). No grad."""
    pm = plugins.get_plugin_manager()
    with torch.no_grad(), distributed.contrast_region(model):
        pm.hook.calplug_observe_contrast_pass(model=model, phase="start")
        built = plan(model, main, config, contrast)
        result = target_gaps(main, built, main_logits, targets, log_softmax=log_softmax)
        pm.hook.calplug_observe_contrast_pass(model=model, phase="end")
    return result


@contextlib.contextmanager
def _no_gradient_checkpointing(decoder: nn.Module) -> Iterator[None]:
    """Turn activation checkpointing off for the no-grad contrast pass: there is nothing to save,
    and checkpointing a no-grad call only warns and recomputes."""
    flagged = [m for m in decoder.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True
