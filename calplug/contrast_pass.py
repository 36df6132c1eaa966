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
import dataclasses
import sys
from typing import Iterator

import torch
from torch import nn

from . import distributed, gap, plugins
from .config import CALConfig
from .contrast import has_image, placeholder_plan
from .errors import CALInputError, UnsupportedModelError, warn_once
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


# -- the self-check: the model's logits are what the contrast side computes ----------------------
HEAD_CHECK_ROWS = 4      # rows compared, once per enabled model
HEAD_CHECK_RTOL = 1e-5   # float32 accumulation-order round-off, relative to sum |h_i * w_i|
NO_FINITE_ROW = "no supervised row of this batch has a finite logit"  # the next step tries again


@dataclasses.dataclass
class HeadCheck:
    """The self-check's finding: the largest difference between the model's own logits and the
    contrast side's ``transform(hidden . W[y] + b)`` at ``rows`` rows of the same final hidden
    states, the tolerance it was held to, and the two logits where the difference was largest.
    ``skipped`` says why no comparison could be made (the values are then 0)."""

    difference: float = 0.0
    tolerance: float = 0.0
    model_logit: float = 0.0
    calplug_logit: float = 0.0
    rows: int = 0
    skipped: str = ""

    @property
    def passed(self) -> bool:
        return not self.skipped and self.difference <= self.tolerance


def _check_rows(main: MainPass, hidden: torch.Tensor, targets: torch.Tensor,
                supervised: torch.Tensor) -> tuple[torch.Tensor, ...] | str:
    """``(logit rows [M, V'] of the model, hidden rows [M, d], target ids [M])`` at up to
    `HEAD_CHECK_ROWS` supervised rows spread over the batch (the last position of a few samples
    when the model made only the last position's logits: ``loss_chunk``); or why none line up."""
    logits = main.logits
    B, L = main.labels.shape
    if hidden.dim() < 2 or hidden.numel() != B * L * hidden.shape[-1]:
        return (f"its output projection received states of shape {tuple(hidden.shape)}, not one per "
                f"position of the {B} x {L} sequence")
    hidden = hidden.reshape(B, L, -1)
    if logits.shape[:2] == (B, 1):  # loss_chunk: the head saw the last position only
        b = torch.arange(min(B, HEAD_CHECK_ROWS), device=logits.device)
        rows_logits, rows_hidden = logits[b, 0], hidden[b, L - 1]
        return rows_logits, rows_hidden, rows_logits.detach().float().argmax(-1)
    if logits.shape[:2] != (B, L):
        return f"its logits have shape {tuple(logits.shape)}, not [{B}, {L}, vocab]"
    shifted = logits[:, :-1].detach().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    where = (supervised & torch.isfinite(shifted)).nonzero()
    if where.shape[0] == 0:
        return NO_FINITE_ROW
    pick = torch.linspace(0, where.shape[0] - 1, min(HEAD_CHECK_ROWS, where.shape[0])).round().long()
    b, i = where[pick.to(where.device)].unbind(1)
    return logits[b, i], hidden[b, i], targets[b, i]


def head_check(main: MainPass, hidden: torch.Tensor, targets: torch.Tensor,
               supervised: torch.Tensor) -> HeadCheck:
    """Compare the model's own logits with what the contrast side computes from the same final
    hidden states (``hidden``: `checked_states` of the main pass):
    the target logit ``hidden . W[y] + b`` (`calplug.gap.hidden_target_logits`), then
    `MainPass.logit_transform`. A forward that transforms its logits after the head (or the
    states between decoder and head) in a way the integration does not declare makes every gap
    mix two kinds of logit; this finds it. Tolerance:
    rounding of the model's logit dtype (4 ulp) plus float32 accumulation round-off. No grad."""
    found = _check_rows(main, hidden, targets, supervised)
    if isinstance(found, str):
        return HeadCheck(skipped=found)
    logits, rows, ids = found
    with torch.no_grad(), distributed.gathered(main.lm_head):
        weight, bias = main.lm_head.weight, getattr(main.lm_head, "bias", None)
        ours = gap.hidden_target_logits(rows, weight, bias, ids)
        magnitude = (rows.float().abs() * weight.index_select(0, ids).float().abs()).sum(-1)
    if main.logit_transform is not None:
        ours = main.logit_transform(ours)
    theirs = logits.detach().gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    eps = torch.finfo(logits.dtype).eps if logits.is_floating_point() else 0.0
    tolerance = 4 * eps * theirs.abs() + HEAD_CHECK_RTOL * (magnitude + 1.0)
    excess = (theirs - ours).abs() - tolerance
    worst = int(excess.argmax())
    return HeadCheck(float((theirs - ours).abs()[worst]), float(tolerance[worst]),
                     float(theirs[worst]), float(ours[worst]), int(ids.shape[0]))


def package_version(model: nn.Module) -> str:
    """``"<package> <version>"`` of the library that defines the model's class, or the class it
    extends (transformers for its classes and a user's subclasses of them), for messages; the
    core imports no model library to say it."""
    for cls in type(model).__mro__:
        package = cls.__module__.split(".")[0]
        version = getattr(sys.modules.get(package), "__version__", None)
        if version and package not in ("torch", "builtins"):
            return f"{package} {version}"
    return "library version unknown"


def head_mismatch_message(model: nn.Module, main: MainPass, found: HeadCheck) -> str:
    transform = "none declared" if main.logit_transform is None else repr(main.logit_transform)
    return (
        f"calplug's self-check stopped {type(model).__name__} ({package_version(model)}): its "
        f"logits are not what calplug's contrast side computes from the same final hidden states "
        f"(hidden . W[y] + b, then the declared logit transform: {transform}). At {found.rows} "
        f"supervised rows they differ by up to {found.difference:.4g} (the model's logit "
        f"{found.model_logit:.6g}, calplug's {found.calplug_logit:.6g}; tolerance "
        f"{found.tolerance:.2g}): the forward transforms its logits after lm_head (a scale, a "
        "soft-cap, ...) in a way calplug does not know, so every gap would compare two kinds of "
        "logit. Fix: declare the transform in the class's FamilyFacts row "
        "(calplug/integrations/families.py, logit_transform) or in your integration's "
        "MainPass.logit_transform, and report it to calplug with the class and version; "
        "check_logits=False turns this check off (the gaps are then wrong by that transform)"
    )


@contextlib.contextmanager
def record_head_input(head: nn.Module, decoder: nn.Module | None = None) -> Iterator[dict]:
    """Record, under ``"hidden"``, what ``head`` (the output projection) receives on its first
    call inside the block, unchanged, and under ``"decoder"`` what ``decoder`` (the model's text
    decoder) returns on its first call: `checked_states` picks the one `head_check` compares from."""
    recorded: dict = {"decoder_module": decoder}

    def pre_hook(module, args, kwargs):
        if "hidden" not in recorded:
            recorded["hidden"] = args[0] if args else next(iter(kwargs.values()), None)

    def decoder_hook(module, args, out):
        if "decoder" not in recorded:
            recorded["decoder"] = out[0] if isinstance(out, (tuple, list)) else \
                getattr(out, "last_hidden_state", None)

    handles = [head.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if decoder is not None:
        handles.append(decoder.register_forward_hook(decoder_hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def checked_states(recorded: dict, main: MainPass) -> torch.Tensor | None:
    """The final hidden states the self-check compares from: where the contrast pass re-runs the
    model's own decoder (``main.decoder`` is it), what that decoder returned, the very states the
    contrast side's target logits come from, so that a forward changing them before its head
    (Inkling divides them by its muP width multiplier) is caught unless declared; where it runs
    a wrapper that maps the decoder's output to the head's input (the kinds' rescale), what the
    head received."""
    states, head_input = recorded.get("decoder"), recorded.get("hidden")
    if not (recorded.get("decoder_module") is main.decoder and isinstance(states, torch.Tensor)
            and isinstance(head_input, torch.Tensor) and states.shape == head_input.shape):
        states = head_input
    if states is not None and main.prefix_rows:  # rows the forward prepended (GIT's image)
        states = states[:, main.prefix_rows:]
    return states


def check_head(model: nn.Module, main: MainPass, hidden: torch.Tensor, targets: torch.Tensor,
               supervised: torch.Tensor) -> HeadCheck:
    """`head_check`, raising `UnsupportedModelError` on a mismatch (the training step's first
    step); a comparison that cannot be made warns once, saying why. Returns the finding; its
    ``skipped`` is `NO_FINITE_ROW` when the batch had no row to compare (the caller retries)."""
    with distributed.contrast_region(model):
        found = head_check(main, hidden, targets, supervised)
    if found.skipped == NO_FINITE_ROW:
        return found
    if found.skipped:
        warn_once(f"head-check:{type(model).__name__}",
                  f"calplug could not run its logit self-check on {type(model).__name__}: "
                  f"{found.skipped}; run `calplug verify` on a batch of yours")
    elif not found.passed:
        raise UnsupportedModelError(head_mismatch_message(model, main, found))
    return found
