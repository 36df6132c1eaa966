"""`enable` / `disable`: install the CAL step (`calplug.step`) as one model instance's forward,
and take it off again.

The install is an instance attribute ``forward`` (the class, and every other instance, is
untouched) that calls the forward the model had: in eval mode or without labels the original is
returned as is. It keeps the original signature, which ``generate()`` and the HF Trainer
inspect. State lives in ``model.__dict__["_calplug_state"]``, outside ``state_dict``. Training
wrappers (PEFT, DeepSpeed, DDP, FSDP, ...) are looked through by one table, `WRAPPERS`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from typing import Callable, Iterator

from torch import nn

from . import plugins
from .classes import class_names, is_named
from .config import CALConfig, resolve_config
from .errors import UnsupportedModelError
from .hookspecs import Contrast, Integration
from .step import COMPILE_REFUSAL, STATE_ATTR, CALForward, CALState, check_loss_plugins_take_hidden_states


# -- model resolution -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Wrapper:
    """A training wrapper `enable` looks through: class names (anywhere in the MRO) and how to
    reach the module it wraps."""

    what: str
    class_names: tuple[str, ...]
    inner: Callable[[nn.Module], nn.Module]


def _module(wrapper: nn.Module) -> nn.Module:
    return wrapper.module


def _data_parallel_module(wrapper: nn.Module) -> nn.Module:
    """nn.DataParallel replicates its module on every forward; a replica would call the CAL
    forward installed on the original, so it is looked through only when it runs one device."""
    devices = len(getattr(wrapper, "device_ids", None) or ())
    if devices > 1:
        raise UnsupportedModelError(
            f"nn.DataParallel over {devices} GPUs copies the model on every forward, and the copies "
            "would run the CAL step of the original's parameters. Use DistributedDataParallel "
            "(torchrun, the HF Trainer, accelerate: one process per GPU, each with "
            "calplug.enable(model)), or train the inner module on one device: "
            "calplug.enable(dp.module) and call dp.module(...) instead of dp(...)"
        )
    return wrapper.module


def _refuse_compiled(wrapper: nn.Module) -> nn.Module:
    raise UnsupportedModelError(
        "calplug.enable got a torch.compile'd model (torch._dynamo OptimizedModule). "
        + COMPILE_REFUSAL + ". The module you compiled is compiled._orig_mod: "
        "calplug.enable(compiled._orig_mod) and train that module, not the compiled one")


WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper("PEFT", ("PeftModel", "PeftMixedModel"), lambda m: m.get_base_model()),
    Wrapper("DeepSpeed", ("DeepSpeedEngine",), _module),
    Wrapper("DistributedDataParallel", ("DistributedDataParallel",), _module),
    Wrapper("FSDP", ("FullyShardedDataParallel",), _module),
    Wrapper("torch.compile", ("OptimizedModule",), _refuse_compiled),
    Wrapper("nn.DataParallel", ("DataParallel",), _data_parallel_module),
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model whose forward computes logits, looked for through every `WRAPPERS` layer."""
    require_module(model)
    while True:
        wrapper = next((w for w in WRAPPERS if is_named(model, w.class_names)), None)
        if wrapper is None:
            return model
        model = wrapper.inner(model)


def require_module(model) -> None:
    """`UnsupportedModelError` saying what to pass when ``model`` is not a torch module (None, a
    hub name, a model class, a trainer or pipeline that holds the model)."""
    if isinstance(model, nn.Module):
        return
    if model is None:
        raise UnsupportedModelError(
            "calplug got None instead of a model: pass the model object itself, e.g. "
            "model = LlavaForConditionalGeneration.from_pretrained(...); calplug.enable(model) "
            "(a function that builds the model may have returned None)")
    if isinstance(model, (str, os.PathLike)):
        raise UnsupportedModelError(
            f"calplug got the name {str(model)!r} instead of a model: calplug does not load models. "
            f"Load it first, e.g. model = AutoModelForImageTextToText.from_pretrained({str(model)!r}), "
            "then calplug.enable(model)")
    if isinstance(model, type):
        raise UnsupportedModelError(
            f"calplug got the class {model.__name__}, not a model instance: build or load the model "
            f"first, e.g. model = {model.__name__}.from_pretrained(...), then calplug.enable(model)")
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        what = type(model).__name__
        trainer = any(name.endswith("Trainer") for name in class_names(model))
        extra = " (or calplug.trainer.enable_for_trainer(trainer), which also sets up logging)" if trainer else ""
        raise UnsupportedModelError(
            f"calplug got a {what}, not a model: pass the model it holds, "
            f"calplug.enable({what.lower()}.model){extra}")
    raise UnsupportedModelError(
        f"calplug needs a torch.nn.Module (a vision-language model), got {type(model).__name__}: "
        "pass the model object, e.g. calplug.enable(model)")


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


def resolve(model: nn.Module, config: CALConfig, integration: Integration | None = None
            ) -> tuple[Integration, Contrast]:
    """The integration for ``model`` (checked) and the contrast ``config`` names, checked against
    each other: what `enable` keeps on the model, and what `calplug.token_gaps` uses for a model
    that is not enabled. Raises with the reason when they cannot run together."""
    if integration is None:
        integration = find_integration(model)
        if integration.check is not None:
            integration.check(model)
    contrast = plugins.resolve_contrast(config.contrast)
    check_contrast_supported(config, integration, model, contrast)
    if config.loss_chunk:
        check_loss_plugins_take_hidden_states()
    return integration, contrast


def check_contrast_supported(config: CALConfig, integration: Integration, model: nn.Module,
                             contrast: Contrast) -> None:
    """Contrasts that transform pixels (``Contrast.needs_pixels``) need an integration that
    re-runs its vision path (``Integration.pixel_contrasts``); an integration can refuse a
    contrast for a model, with the reason (``Integration.contrast_refusal``)."""
    if integration.contrast_refusal is not None:
        reason = integration.contrast_refusal(model, config.contrast)
        if reason:
            raise UnsupportedModelError(f"contrast={config.contrast!r} on {type(model).__name__}: {reason}")
    if contrast.needs_pixels and not integration.pixel_contrasts:
        able = sorted({c for i in plugins.integrations() if i.pixel_contrasts for c in i.model_classes})
        raise UnsupportedModelError(
            f"contrast={config.contrast!r} transforms the input pixels, and integration "
            f"{integration.name!r} cannot re-run its vision path. Model classes that can: "
            f"{', '.join(able) or 'none'}. Use contrast='drop', 'mask' or 'patch_mask' instead."
        )


# -- public API -----------------------------------------------------------------------------------
def enable(model: nn.Module, config=None, **overrides) -> nn.Module:
    """Install the CAL step on ``model`` (this instance only): its training forward then returns
    the CAL loss.

    ``config`` is a `CALConfig`, a dict, a YAML path or None (then ``$CALPLUG_CONFIG`` or the
    defaults); keyword ``overrides`` apply on top. Enabling an enabled model only updates its
    config. Returns ``model`` (the object passed in, wrappers included).
    """
    target = unwrap_model(model)
    state: CALState | None = target.__dict__.get(STATE_ATTR)
    if state is not None:
        base = state.config if config is None else config
        new_config = resolve_config(base, **overrides)
        _, state.contrast = resolve(target, new_config, state.integration)
        state.config = new_config
        return model
    cfg = resolve_config(config, **overrides)
    integration, contrast = resolve(target, cfg)
    signature = inspect.signature(target.forward)
    original = target.__dict__.get("forward")
    target.__dict__[STATE_ATTR] = CALState(cfg, integration, contrast, original, signature)
    target.forward = CALForward(target)
    return model


def checked_config(config=None, **overrides) -> CALConfig:
    """`resolve_config`, and the contrast it names resolved against the registered ones: every
    error `enable` would raise about the settings alone, raised now (for adapters and scripts
    that read settings long before the model exists)."""
    cfg = resolve_config(config, **overrides)
    plugins.resolve_contrast(cfg.contrast)
    return cfg


def enable_for_stage(model: nn.Module, stage: str, config=None, **overrides) -> bool:
    """Enable CAL when the config's ``stages`` covers ``stage`` ("pretrain" or "finetune").

    For training scripts that know their stage (LLaVA: pre-training is when only the projector is
    tuned). Returns whether CAL is now enabled; when the stage is not covered, a model enabled
    earlier is disabled, so one call per run is enough.
    """
    cfg = checked_config(config, **overrides)  # a bad setting fails in every stage
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
    kept = (previous.config, previous.contrast) if previous is not None else None
    enable(model, config, **overrides)
    try:
        yield model
    finally:
        if previous is None:
            disable(model)
        else:
            previous.config, previous.contrast = kept
