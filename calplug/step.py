"""The CAL training step: what the forward of an enabled model does in training mode with labels.

`cal_forward` is the forward `calplug.enable` installs; `training_step` runs the algorithm's
steps as numbered in docs/cal.md, using only what the integration's `MainPass`, the contrast
`calplug.enable` resolved, the registered frameworks' records and the plugin hooks
(`calplug.hookspecs`) hand it: it knows no model family and no framework. The contrast pass is
`calplug.contrast_pass`, the same machinery `calplug.token_gaps` runs outside training.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import pickle
from typing import Any, Iterator

import torch
from torch import nn

from . import batch_checks, contrast_pass, distributed, gap, guards, plugins
from .config import CALConfig
from .errors import CALConfigError, CALError, CALInputError, UnsupportedModelError
from .hookspecs import VISUAL_MASK_ARGUMENT, Contrast, Integration, MainPass

STATE_ATTR = "_calplug_state"
COMPILE_REFUSAL = (
    "calplug cannot run under torch.compile: the CAL step decides per batch whether and how to run "
    "its contrast pass, which compiling the whole model cannot trace. Enable calplug on the "
    "uncompiled model (calplug.enable(model), not calplug.enable(torch.compile(model))) and "
    "train it uncompiled (HF Trainer: torch_compile=False)"
)


@dataclasses.dataclass
class LossUse:
    """How many CAL training steps with a gradient ran on this model (``steps``), and how many of
    their losses a backward pass went through (``backwards``): a trainer that calls the model
    without labels runs no step, one that computes its own loss from the logits runs steps whose
    loss no backward reaches. `calplug.trainer` compares them over the first optimiser step."""

    steps: int = 0
    backwards: int = 0

    def record(self, loss: torch.Tensor) -> None:
        if loss.requires_grad:
            self.steps += 1
            loss.register_hook(self._reached)

    def _reached(self, grad):
        self.backwards += 1


@dataclasses.dataclass
class CALState:
    """What `calplug.enable` leaves on a model, in ``model.__dict__[STATE_ATTR]`` (outside
    ``state_dict``): the config, the integration, the contrast the config names (resolved once,
    at enable), the forward to call and to restore, and what became of its losses."""

    config: CALConfig
    integration: Integration
    contrast: Contrast
    original_forward: Any          # the instance attribute `forward` had before, or None
    signature: inspect.Signature   # of the forward the model had: CALForward keeps it
    no_images: guards.NoImageWatch = dataclasses.field(default_factory=guards.NoImageWatch)
    loss_use: LossUse = dataclasses.field(default_factory=LossUse)
    logits_checked: bool = False   # the first step's self-check has passed (or was skipped)

    # Pickling (torch.save of a whole model): every field pickles, the integration by reference to
    # module-level functions, so a loaded model comes back enabled. A plugin's integration built
    # from local functions cannot; the error then says what to do instead of pickle's "Can't
    # pickle local object". copy.deepcopy copies functions by reference and needs no such check.
    def __getstate__(self) -> dict:
        for what, record in (("integration", self.integration), ("contrast", self.contrast)):
            try:
                pickle.dumps(record)
            except Exception as error:
                raise CALError(
                    f"this model's calplug state cannot be pickled: its {what} {record.name!r} (from "
                    "a plugin) holds something pickle cannot save "
                    f"({' '.join(str(error).split())}). Call calplug.disable(model) before saving and "
                    "calplug.enable(model) after loading, or save model.state_dict() / "
                    "save_pretrained(), which hold no calplug state. Plugin authors: build "
                    "Integration and Contrast records from module-level functions (docs/plugins.md)"
                ) from None
        return dict(self.__dict__)

    def __deepcopy__(self, memo: dict) -> "CALState":
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return copied


class CALForward:
    """The instance attribute ``forward`` of an enabled model: calls `cal_forward`.

    A plain object rather than a closure, so that copying the model copies it with the model.
    Its ``__signature__`` is the forward's own, which ``generate()`` and the HF Trainer inspect.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        return self.model.__dict__[STATE_ATTR].signature

    def __call__(self, *args, **kwargs):
        return cal_forward(self.model, args, kwargs)


def original_forward(model: nn.Module, state: CALState):
    """The forward the model had before `calplug.enable`, bound to it."""
    if state.original_forward is None:
        return type(model).forward.__get__(model)
    return state.original_forward


# -- step 8: CAL acts in training mode with labels only ---------------------------------------
def cal_forward(model: nn.Module, args: tuple, kwargs: dict):
    state: CALState = model.__dict__[STATE_ATTR]
    original = original_forward(model, state)
    call = state.signature.bind_partial(*args, **kwargs).arguments
    extra = call.pop(next((n for n, p in state.signature.parameters.items()
                           if p.kind is p.VAR_KEYWORD), "\0"), {})
    call.update(extra)
    if not model.training or call.get("labels") is None:
        kwargs.pop(VISUAL_MASK_ARGUMENT, None)  # an adapter's key, never the model's
        return original(*args, **kwargs)
    if torch.compiler.is_compiling():
        raise UnsupportedModelError(COMPILE_REFUSAL)
    return training_step(model, original, state, call)


def training_step(model: nn.Module, original, state: CALState, call: dict):
    """Steps 1-7 for one micro-batch; returns the model's output type with the CAL loss."""
    config = state.config
    batch_checks.check_labels(call["labels"])   # dtype and shape (calplug/batch_checks.py)
    num_items_in_batch = call.pop("num_items_in_batch", None)
    pm = plugins.get_plugin_manager()
    if config.loss_chunk:  # checked at enable too; a plugin may have come since
        check_loss_plugins_take_hidden_states()
    for framework in plugins.frameworks():      # a caller that would discard the CAL loss
        if framework.check_call is not None:
            framework.check_call(call)
    guards.refuse_packed_call(call)
    carried_images = guards.carries_images(call)
    # step 1: the main pass, with grad (with loss_chunk, the head sees the last position only;
    # on the first step the head's input is kept for the self-check)
    check = config.check_logits and not state.logits_checked
    with _head_on_last_position(model, state.integration, config.loss_chunk) as head_input, \
            _head_input_once(model, state.integration, check and not config.loss_chunk) as checked_input:
        main: MainPass = state.integration.main_pass(model, original, call)
    hidden = head_input.get("hidden")  # [B, L, d] final hidden states when loss_chunk > 0
    if hidden is not None and main.prefix_rows:
        hidden = hidden[:, main.prefix_rows:]  # rows the forward prepended (GIT's image): no labels
    if hidden is not None and main.logit_transform is not None:
        raise CALConfigError(
            f"loss_chunk={config.loss_chunk} computes logits as lm_head(hidden), but "
            f"{type(model).__name__} transforms its logits after lm_head "
            f"({main.logit_transform!r}): set loss_chunk=0"
        )
    seq_shape = main.logits.shape[:2] if hidden is None else hidden.shape[:2]
    if seq_shape != main.labels.shape:
        raise CALInputError(
            f"labels of shape {tuple(main.labels.shape)} do not match the sequence the model "
            f"produced logits for ({tuple(seq_shape)}): labels must be [batch, seq_len] "
            "aligned with the model's inputs"
        )
    batch_checks.check_label_values(main.labels, vocab=main.logits.shape[-1],
                                    visual_mask=main.visual_mask)
    guards.refuse_restarting_positions(main.position_ids, main.attention_mask)
    state.no_images.observe(carried_images, main.found_image, type(model).__name__)
    # step 3: shift; ignored rows take token 0 as their target
    shifted, targets, supervised = gap.shift_targets(main.labels)
    head_states = hidden if hidden is not None else contrast_pass.checked_states(checked_input, main)
    if check and head_states is not None:  # once per enabled model: the logits are lm_head's
        found = contrast_pass.check_head(model, main, head_states.detach(), targets, supervised)
        state.logits_checked = found.skipped != contrast_pass.NO_FINITE_ROW
    with torch.no_grad():
        if hidden is None:
            main_logits = gap.main_target_logits(main.logits.detach(), targets)
        else:
            main_logits = _hidden_main_logits(main, hidden.detach(), targets)
        # steps 2 and 4: the contrast pass and the target-token gaps
        gaps, contrasted, _ = contrast_pass.measure(model, main, config, state.contrast,
                                                    main_logits, targets)
        weighed = batch_checks.finite_gaps(gaps, main_logits, supervised)  # NaN / inf -> 0
    # steps 5-6: clamp and smooth (the built-in weighting), or a plugin's weights
    weights = pm.hook.calplug_weights(gaps=weighed, labels=shifted, supervised=supervised, config=config)
    # step 7: the weighted, normalised cross-entropy (chunked when hidden states were recorded)
    loss = pm.hook.calplug_loss(logits=None if hidden is not None else main.logits,
                                labels=main.labels, weights=weights, config=config,
                                num_items_in_batch=num_items_in_batch, hidden_states=hidden,
                                lm_head=main.lm_head)
    if main.extra_loss is not None:  # e.g. a MoE router's load-balancing term, as the model adds it
        loss = loss + main.extra_loss.to(loss.dtype)
    state.loss_use.record(loss)
    pm.hook.calplug_observe_step(model=model, gaps=gaps, weights=weights.detach(), labels=shifted,
                                 supervised=supervised, contrasted=contrasted, config=config)
    return _with_loss(main.output, loss, weights.detach(), gaps)


# -- loss_chunk: no full logits -----------------------------------------------------------------
@contextlib.contextmanager
def _head_on_last_position(model: nn.Module, integration: Integration, chunk: int) -> Iterator[dict]:
    """With ``loss_chunk > 0``: during the main pass, the output projection receives only the
    last position (so the model's logits are ``[B, 1, V]``), and the full ``[B, L, d]`` hidden
    states it was given are recorded for the chunked loss. A no-op when ``chunk`` is 0."""
    recorded: dict = {}
    if not chunk:
        yield recorded
        return
    if integration.decoder_and_head is None:
        raise CALConfigError(
            f"loss_chunk={chunk} needs to know the output projection before the forward runs, and "
            f"integration {integration.name!r} does not say where it is "
            "(Integration.decoder_and_head): set loss_chunk=0"
        )
    if distributed.is_sharded(model):
        raise CALConfigError(
            f"loss_chunk={chunk} keeps the lm_head weight from the main pass for the backward of "
            "its chunked loss, and a sharded model (DeepSpeed ZeRO-3, FSDP fully_shard or "
            "FullyShardedDataParallel) partitions that weight again after the forward: set "
            "loss_chunk=0 under sharded training"
        )
    _, head = integration.decoder_and_head(model)
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise CALConfigError(
            f"loss_chunk={chunk} needs a plain torch.nn.Linear output projection, found "
            f"{type(head).__name__}: adapters or quantisation on lm_head change its output; "
            "set loss_chunk=0"
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


@contextlib.contextmanager
def _head_input_once(model: nn.Module, integration: Integration, active: bool) -> Iterator[dict]:
    """For the self-check: the final hidden states of the main pass, as the decoder returns them
    and as the head receives them (`contrast_pass.record_head_input`). A no-op when not ``active`` or when the integration does
    not say where the head is (`Integration.decoder_and_head`): the check is then not run."""
    if not active or integration.decoder_and_head is None:
        yield {}
        return
    decoder, head = integration.decoder_and_head(model)
    with contrast_pass.record_head_input(head, decoder) as recorded:
        yield recorded


def _hidden_main_logits(main: MainPass, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, L-1]`` main-pass target logits from the final hidden states (chunked mode)."""
    B, L, d = hidden.shape
    rows = (torch.arange(B, device=hidden.device).unsqueeze(1) * L
            + torch.arange(L - 1, device=hidden.device)).reshape(-1)
    out = gap.hidden_target_logits(hidden.reshape(B * L, d), main.lm_head.weight,
                                   getattr(main.lm_head, "bias", None), targets.reshape(-1), rows=rows)
    return out.view(B, L - 1)


def check_loss_plugins_take_hidden_states() -> None:
    """``loss_chunk > 0`` hands `calplug_loss` no logits: an implementation that does not declare
    ``hidden_states`` cannot compute that loss, so the setting is refused (the hook's contract)."""
    pm = plugins.get_plugin_manager()
    unable = [impl.plugin_name for impl in pm.hook.calplug_loss.get_hookimpls()
              if "hidden_states" not in impl.argnames]
    if unable:
        raise CALConfigError(
            f"loss_chunk > 0 computes the loss without full logits, and the calplug_loss "
            f"implementation of {', '.join(unable)} takes no hidden_states argument, so it cannot "
            "take part: set loss_chunk=0, or give that implementation a hidden_states argument "
            "(docs/plugins.md)"
        )


# -- the output -----------------------------------------------------------------------------------
def _with_loss(output, loss: torch.Tensor, weights: torch.Tensor, gaps: torch.Tensor):
    """The model's own output type with ``loss`` set first, plus ``cal_weights`` / ``cal_gaps``."""
    if isinstance(output, tuple):
        return (loss,) + tuple(x for x in output if x is not None)
    fields = {k: v for k, v in output.items() if k != "loss"}
    try:
        result = type(output)(loss=loss, **fields)
    except TypeError:  # an output type without a `loss` field
        result = output
        result["loss"] = loss
    result.cal_weights = weights
    result.cal_gaps = gaps
    return result
