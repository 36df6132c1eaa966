"""`enable` / `disable`: patch one model instance so its training forward returns the CAL loss.

The patch is an instance attribute ``forward`` (the class, and every other instance, is untouched)
that wraps the forward the model had, and calls it: in eval mode or without labels the original
is returned as is. The wrapper keeps the original signature, which ``generate()`` and the HF
Trainer inspect. State lives in ``model.__dict__["_calplug_state"]``, outside ``state_dict``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
from typing import Any, Iterator

import torch
from torch import nn

from . import distributed, gap, plugins
from .config import CALConfig, resolve_config
from .contrast import ContrastPlan, placeholder_plan
from .errors import CALConfigError, CALInputError, UnsupportedModelError
from .integration import Integration, MainPass, pixel_contrast_embeds
from .loss import chunked_weighted_cross_entropy

STATE_ATTR = "_calplug_state"


@dataclasses.dataclass
class CALState:
    config: CALConfig
    integration: Integration
    original_forward: Any          # the instance attribute `forward` had before, or None
    signature: inspect.Signature


# -- model resolution -----------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model whose forward computes logits: through PEFT, DeepSpeed, DDP and FSDP wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel",
                                      "FullyShardedDataParallel") and hasattr(model, "module"):
            model = model.module
    return model


def find_integration(model: nn.Module) -> Integration:
    known = plugins.integrations()
    for integration in known:
        if integration.matches(model):
            return integration
    supported = sorted({cls for i in known for cls in i.model_classes})
    raise UnsupportedModelError(
        f"calplug has no integration for {type(model).__module__}.{type(model).__name__}. "
        f"Supported model classes: {', '.join(supported)}. "
        "A plugin can add one through the `calplug_integrations` hook (docs/plugins.md)."
    )


def check_contrast_supported(config: CALConfig, integration: Integration) -> None:
    """Contrasts that transform pixels (``needs_pixels = True`` on the function) need an
    integration that can re-run its vision path."""
    build = plugins.contrasts()[config.contrast]
    if getattr(build, "needs_pixels", False) and not integration.supports_blur:
        able = sorted({c for i in plugins.integrations() if i.supports_blur for c in i.model_classes})
        raise UnsupportedModelError(
            f"contrast={config.contrast!r} transforms the input pixels, and integration "
            f"{integration.name!r} cannot re-run its vision path. Model classes that can: "
            f"{', '.join(able) or 'none'}. Use contrast='drop', 'mask' or 'patch_mask' instead."
        )


# -- public API -----------------------------------------------------------------------------------
def enable(model: nn.Module, config=None, **overrides) -> nn.Module:
    """Patch ``model`` (this instance only) so that its training forward returns the CAL loss.

    ``config`` is a `CALConfig`, a dict, a YAML path or None (then ``$CALPLUG_CONFIG`` or the
    defaults); keyword ``overrides`` apply on top. Enabling an enabled model only updates its
    config. Returns ``model`` (the object passed in, wrappers included).
    """
    target = unwrap_model(model)
    state: CALState | None = target.__dict__.get(STATE_ATTR)
    if state is not None:
        base = state.config if config is None else config
        new_config = resolve_config(base, **overrides)
        check_contrast_supported(new_config, state.integration)
        state.config = new_config
        return model
    cfg = resolve_config(config, **overrides)
    integration = find_integration(target)
    if integration.check is not None:
        integration.check(target)
    check_contrast_supported(cfg, integration)
    signature = inspect.signature(target.forward)
    original = target.__dict__.get("forward")
    target.__dict__[STATE_ATTR] = CALState(cfg, integration, original, signature)
    target.forward = types.MethodType(_make_forward(signature), target)
    return model


def enable_for_stage(model: nn.Module, stage: str, config=None, **overrides) -> bool:
    """Enable CAL when the config's ``stages`` covers ``stage`` ("pretrain" or "finetune").

    For training scripts that know their stage (LLaVA: pre-training is when only the projector is
    tuned). Returns whether CAL is now enabled; when the stage is not covered, a model enabled
    earlier is disabled, so one call per run is enough.
    """
    cfg = resolve_config(config, **overrides)
    if cfg.covers_stage(stage):
        enable(model, cfg)
        return True
    disable(model)
    return False


def disable(model: nn.Module) -> nn.Module:
    """Undo `enable`: the instance gets back exactly the forward it had. A no-op when not enabled."""
    target = unwrap_model(model)
    state: CALState | None = target.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return model
    if state.original_forward is None:
        target.__dict__.pop("forward", None)
    else:
        target.__dict__["forward"] = state.original_forward
    return model


def is_enabled(model: nn.Module) -> bool:
    return STATE_ATTR in unwrap_model(model).__dict__


def config_of(model: nn.Module) -> CALConfig | None:
    state = unwrap_model(model).__dict__.get(STATE_ATTR)
    return None if state is None else state.config


@contextlib.contextmanager
def enabled(model: nn.Module, config=None, **overrides) -> Iterator[nn.Module]:
    """``with calplug.enabled(model): ...`` -- CAL inside the block, the previous state after."""
    target = unwrap_model(model)
    previous = target.__dict__.get(STATE_ATTR)
    previous_config = previous.config if previous is not None else None
    enable(model, config, **overrides)
    try:
        yield model
    finally:
        if previous is None:
            disable(model)
        else:
            previous.config = previous_config


# -- the patched forward --------------------------------------------------------------------------
def _make_forward(signature: inspect.Signature):
    def forward(self, *args, **kwargs):
        return cal_forward(self, args, kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    forward.__doc__ = "CAL-patched forward (calplug). " + (forward.__doc__ or "")
    return forward


def _original_forward(model: nn.Module, state: CALState):
    if state.original_forward is None:
        return type(model).forward.__get__(model)
    return state.original_forward


def cal_forward(model: nn.Module, args: tuple, kwargs: dict):
    state: CALState = model.__dict__[STATE_ATTR]
    original = _original_forward(model, state)
    call = state.signature.bind_partial(*args, **kwargs).arguments
    extra = call.pop(next((n for n, p in state.signature.parameters.items()
                           if p.kind is p.VAR_KEYWORD), "\0"), {})
    call.update(extra)
    if not model.training or call.get("labels") is None:
        return original(*args, **kwargs)
    if call.get("fused_lm_head"):
        raise CALConfigError(
            "this training forward was called with fused_lm_head=True: the caller (TRL's "
            "SFTTrainer) computes its own cross-entropy through a fused LM head and would ignore "
            "the CAL loss. Build the trainer first, then call "
            "calplug.trainer.enable_for_trainer(trainer) (docs/distributed.md)"
        )
    return cal_training_step(model, original, state, call)


def cal_training_step(model: nn.Module, original, state: CALState, call: dict):
    config = state.config
    num_items_in_batch = call.pop("num_items_in_batch", None)
    integration = state.integration
    build_contrast = plugins.contrasts()[config.contrast]
    # Only a contrast that transforms pixels needs the forward's arguments kept for a re-run.
    rerun_call = dict(call) if integration.pixel_keys and getattr(build_contrast, "needs_pixels", False) else None
    with _head_on_last_position(model, config.loss_chunk) as head_input:
        main: MainPass = integration.main_pass(model, original, call)
    if rerun_call is not None and main.contrast_embeds is None and _has_pixels(rerun_call, integration):
        main.contrast_embeds = pixel_contrast_embeds(original, main.decoder, rerun_call,
                                                     integration.pixel_keys)
    hidden = head_input.get("hidden")  # [B, L, d] final hidden states when loss_chunk > 0
    seq_shape = main.logits.shape[:2] if hidden is None else hidden.shape[:2]
    if seq_shape != main.labels.shape:
        raise CALInputError(
            f"labels of shape {tuple(main.labels.shape)} do not match the sequence the model "
            f"produced logits for ({tuple(seq_shape)}): labels must be [batch, seq_len] "
            "aligned with the model's inputs"
        )
    shifted, targets, supervised = gap.shift_targets(main.labels)
    with torch.no_grad():
        if hidden is None:
            main_logits = gap.main_target_logits(main.logits.detach(), targets)
        else:
            main_logits = _hidden_main_logits(main, hidden.detach(), targets)
        plan = _contrast_plan(model, main, config, build_contrast)
        delta = _delta(main, plan, main_logits, targets)
    pm = plugins.get_plugin_manager()
    weights = pm.hook.calplug_weights(delta=delta, labels=shifted, supervised=supervised, config=config)
    if hidden is None:
        loss = pm.hook.calplug_loss(logits=main.logits, labels=main.labels, weights=weights,
                                    config=config, num_items_in_batch=num_items_in_batch)
    else:
        _check_no_loss_plugin(pm)
        loss = chunked_weighted_cross_entropy(hidden, main.lm_head.weight,
                                              getattr(main.lm_head, "bias", None), main.labels,
                                              weights, config.loss_chunk, num_items_in_batch)
    if main.extra_loss is not None:  # e.g. a MoE router's load-balancing term, as the model adds it
        loss = loss + main.extra_loss.to(loss.dtype)
    pm.hook.calplug_observe_step(model=model, delta=delta, weights=weights.detach(), labels=shifted,
                                 supervised=supervised, config=config)
    return _with_loss(main.output, loss, weights.detach(), delta)


def _contrast_plan(model: nn.Module, main: MainPass, config: CALConfig,
                   build_contrast) -> ContrastPlan | None:
    """This rank's contrast plan; under ZeRO-3 / FSDP, one that runs the same modules on every rank.

    A rank with nothing to contrast would skip the contrast pass while others run it, and their
    collective parameter gathers would pair up wrongly (a crash or a hang). Plain contrasts
    (drop, mask, patch_mask) build their plan without running any module, so ranks agree after
    building: a rank without a plan runs a one-token placeholder through the decoder. A contrast
    that re-runs the vision tower on transformed pixels (``needs_pixels``: blur) runs modules
    while building, so ranks agree before: a rank whose micro-batch has pixels but no image
    positions (the LLaVA codebases' dummy images) re-runs its vision path unchanged, and a rank
    with no pixels at all cannot, which is an error on every rank at once rather than a hang.
    """
    if not (getattr(build_contrast, "needs_pixels", False) and distributed.must_agree(model)):
        plan = build_contrast(main, config)
        if distributed.any_rank(plan is not None, model) and plan is None:
            plan = placeholder_plan(main)
        return plan
    has_visual = bool(main.visual_mask.any())
    can_rerun = main.contrast_embeds is not None  # set only when this micro-batch has pixels
    any_visual, any_without_pixels = distributed.any_rank_each([has_visual, not can_rerun], model)
    if not any_visual:
        return None
    if any_without_pixels:
        raise CALInputError(
            f"contrast={config.contrast!r} re-runs the vision tower in the contrast pass, and under "
            "DeepSpeed ZeRO-3 / FSDP every rank must then run it, but at least one rank's "
            "micro-batch has no pixel values. Give text-only micro-batches a dummy image (as the "
            "LLaVA codebases do), or use contrast='drop', 'mask' or 'patch_mask'"
        )
    if not has_visual:
        main.contrast_embeds(lambda pixels: pixels)  # the same vision-tower gathers as the others
        return placeholder_plan(main)
    plan = build_contrast(main, config)
    return placeholder_plan(main) if plan is None else plan


def _has_pixels(call: dict, integration: Integration) -> bool:
    """Whether the forward was given any pixels under the integration's pixel keys (a rank
    without them has no vision path to re-run)."""
    for key in integration.pixel_keys:
        value = call.get(key)
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            return True
        if isinstance(value, (list, tuple)) and any(
                isinstance(v, torch.Tensor) and v.numel() > 0 for v in value):
            return True
    return False


def _delta(main: MainPass, plan: ContrastPlan | None, main_logits: torch.Tensor,
           targets: torch.Tensor) -> torch.Tensor:
    if plan is None:
        return torch.zeros_like(main_logits)
    with _no_gradient_checkpointing(main.decoder):
        out = main.decoder(**plan.decoder_kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = plan.rows[:, :-1]
    has = rows >= 0
    with distributed.gathered(main.lm_head):
        contrast = gap.hidden_target_logits(hidden, main.lm_head.weight,
                                            getattr(main.lm_head, "bias", None), targets[has],
                                            rows=rows[has])
    return gap.target_gap(main_logits, targets, contrast, has)


@contextlib.contextmanager
def _head_on_last_position(model: nn.Module, chunk: int) -> Iterator[dict]:
    """With ``loss_chunk > 0``: during the main pass, the output projection receives only the
    last position (so the model's logits are ``[B, 1, V]``), and the full ``[B, L, d]`` hidden
    states it was given are recorded for the chunked loss. A no-op when ``chunk`` is 0."""
    recorded: dict = {}
    if not chunk:
        yield recorded
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise CALConfigError(
            f"loss_chunk={chunk} needs a plain torch.nn.Linear output projection "
            f"(model.get_output_embeddings()), found {type(head).__name__}: adapters or "
            "quantisation on lm_head change its output; set loss_chunk=0"
        )
    if distributed.is_sharded(model):
        raise CALConfigError(
            f"loss_chunk={chunk} reads the lm_head weight directly, which a sharded model "
            "(DeepSpeed ZeRO-3, FSDP) partitions: set loss_chunk=0"
        )

    def pre_hook(module, args):
        if recorded:
            return None
        recorded["hidden"] = args[0]
        return (args[0][..., -1:, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield recorded
    finally:
        handle.remove()
    if not recorded:
        raise CALInputError(f"loss_chunk={chunk}: the model never called its output projection")


def _hidden_main_logits(main: MainPass, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, L-1]`` main-pass target logits from the final hidden states (chunked mode)."""
    B, L, d = hidden.shape
    rows = (torch.arange(B, device=hidden.device).unsqueeze(1) * L
            + torch.arange(L - 1, device=hidden.device)).reshape(-1)
    out = gap.hidden_target_logits(hidden.reshape(B * L, d), main.lm_head.weight,
                                   getattr(main.lm_head, "bias", None), targets.reshape(-1), rows=rows)
    return out.view(B, L - 1)


def _check_no_loss_plugin(pm) -> None:
    others = [impl.plugin_name for impl in pm.hook.calplug_loss.get_hookimpls()
              if impl.plugin_name != "calplug.builtin"]
    if others:
        raise CALConfigError(
            f"loss_chunk > 0 computes the loss without full logits, so the calplug_loss "
            f"implementation of {', '.join(others)} cannot take part: set loss_chunk=0"
        )


@contextlib.contextmanager
def _no_gradient_checkpointing(decoder: nn.Module):
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


def _with_loss(output, loss: torch.Tensor, weights: torch.Tensor, delta: torch.Tensor):
    """The model's own output type with ``loss`` set first, plus ``cal_weights`` / ``cal_delta``."""
    if isinstance(output, tuple):
        return (loss,) + tuple(x for x in output if x is not None)
    fields = {k: v for k, v in output.items() if k != "loss"}
    try:
        result = type(output)(loss=loss, **fields)
    except TypeError:  # an output type without a `loss` field
        result = output
        result["loss"] = loss
    result.cal_weights = weights
    result.cal_delta = delta
    return result
