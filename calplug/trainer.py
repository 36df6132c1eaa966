"""Logging CAL's weights from training loops: an observer plugin and an HF `TrainerCallback`.

    from calplug.trainer import CALLoggingCallback
    trainer = Trainer(model=calplug.enable(model), ..., callbacks=[CALLoggingCallback()])
    # or, for a trainer built elsewhere (TRL's SFTTrainer, ...):
    calplug.trainer.attach(trainer)

`CALStats` is a plain calplug plugin (``calplug_observe_step``) that accumulates, over the
supervised rows of every CAL step since the last report:

* ``cal/mean_weight``   the mean loss weight (after clamping and pooling);
* ``cal/share_alpha``   the share of rows whose gap is at or below ``alpha`` (clamped up);
* ``cal/share_beta``    the share of rows whose gap is at or above ``beta`` (clamped down);
* ``cal/mean_gap``      the mean gap; ``cal/tokens`` how many rows these describe;
* ``cal/share_contrasted`` the share of rows that got a contrast value (rows of samples without
  an image have none: their gap is 0 and their weight ``alpha``);
* a histogram of the gaps (fixed bins over ``[alpha - (beta - alpha), beta + (beta - alpha)]``,
  values outside counted in the edge bins);
* ``cal/ignored_batches`` how many micro-batches had no supervised row (loss 0; see
  docs/errors.md), and ``cal/nonfinite_gaps`` how many supervised rows had a NaN or infinite gap
  (weighted as gap 0; left out of the gap mean, extremes and histogram). Both are reported with
  every log once a CAL step was seen, 0 included, so a dashboard can alert on them.

The callback adds the scalars to every Trainer log (so every installed reporter, TensorBoard,
wandb, ..., receives them, and ``trainer.state.log_history`` holds them) and writes the histogram
to TensorBoard (``cal/gap``) and wandb when those reporters are active. Under data parallelism
(DDP, DeepSpeed, multi-node) the callback sums the statistics over all ranks before it logs (two
small all-reduces per log, which every rank makes since the Trainer logs on every rank), so the
numbers describe the whole global batch, not rank 0's share of it. Without transformers, use
`CALStats` alone: ``stats = CALStats().register()``, then ``stats.reduce_over_ranks()`` (under
data parallelism, on every rank) and ``stats.scalars()`` / ``stats.histogram()`` whenever you log.
"""
from __future__ import annotations

import math

import torch

from . import distributed, plugins
from .classes import is_named
from .errors import CALConfigError
from .hookspecs import hookimpl
from .step import STATE_ATTR

try:  # the callback needs transformers; CALStats does not
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a dependency of calplug
    _CallbackBase = object

PREFIX = "cal/"


class CALStats:
    """Accumulates CAL weight statistics from ``calplug_observe_step`` until `reset`."""

    def __init__(self, bins: int = 24, name: str | None = None):
        self.bins = int(bins)
        self.name = name or f"calplug.trainer.CALStats-{id(self):x}"
        self.edges: torch.Tensor | None = None
        self.reset()

    # -- plugin registration -----------------------------------------------------------------
    def register(self) -> "CALStats":
        pm = plugins.get_plugin_manager()
        if pm.get_plugin(self.name) is None:
            plugins.register(self, name=self.name)
        return self

    def unregister(self) -> None:
        pm = plugins.get_plugin_manager()
        if pm.get_plugin(self.name) is not None:
            plugins.unregister(name=self.name)

    # -- the hook ----------------------------------------------------------------------------
    @hookimpl
    def calplug_observe_step(self, gaps, weights, supervised, contrasted, config):
        sup = supervised
        gaps = gaps[sup].detach().float().cpu()
        w = weights[sup].detach().float().cpu()
        if self.edges is None:
            span = max(config.beta - config.alpha, 1e-6)
            self.edges = torch.linspace(config.alpha - span, config.beta + span, self.bins + 1)
        self.steps += 1
        self.ignored_batches += int(gaps.numel() == 0)
        self.tokens += int(gaps.numel())
        self.contrasted += int(contrasted[sup].sum())
        self.weight_sum += float(w.sum())
        finite = torch.isfinite(gaps)
        self.nonfinite_gaps += int((~finite).sum())
        weighed = torch.where(finite, gaps, torch.zeros_like(gaps))  # as the weighting saw them
        gaps = gaps[finite]
        self.at_alpha += int((weighed <= config.alpha).sum())
        self.at_beta += int((weighed >= config.beta).sum())
        self.gap_sum += float(gaps.sum())
        self.gap_sq_sum += float((gaps * gaps).sum())
        if gaps.numel():
            self.gap_min = min(self.gap_min, float(gaps.min()))
            self.gap_max = max(self.gap_max, float(gaps.max()))
            inner = self.edges[1:-1].contiguous()
            self.counts += torch.bincount(torch.bucketize(gaps, inner, right=True),
                                          minlength=self.bins)

    # -- reading -----------------------------------------------------------------------------
    # Counters summed over steps (and over ranks by `reduce_over_ranks`); floats are sums of values.
    COUNTS = ("steps", "tokens", "at_alpha", "at_beta", "contrasted", "ignored_batches", "nonfinite_gaps")
    SUMS = ("weight_sum", "gap_sum", "gap_sq_sum")

    def reset(self) -> None:
        for name in self.COUNTS:
            setattr(self, name, 0)
        for name in self.SUMS:
            setattr(self, name, 0.0)
        self.gap_min = math.inf
        self.gap_max = -math.inf
        self.counts = torch.zeros(self.bins, dtype=torch.long)

    def reduce_over_ranks(self) -> None:
        """Replace this rank's statistics by those of all ranks together (sums, and the extreme
        gaps). A collective call: every rank of the process group must make it, with the same
        ``bins``. A no-op without a process group."""
        names = self.COUNTS + self.SUMS
        sums = torch.tensor([getattr(self, n) for n in names] + self.counts.tolist(),
                            dtype=torch.float64)
        sums = distributed.reduce_over_ranks(sums, "sum")
        extremes = distributed.reduce_over_ranks(
            torch.tensor([-self.gap_min, self.gap_max], dtype=torch.float64), "max")
        for i, name in enumerate(names):
            setattr(self, name, int(round(float(sums[i]))) if name in self.COUNTS else float(sums[i]))
        self.counts = sums[len(names):].round().long()
        self.gap_min, self.gap_max = -float(extremes[0]), float(extremes[1])

    def scalars(self) -> dict[str, float]:
        """The scalar statistics since the last reset ({} when no CAL step was seen; the problem
        counts only when no supervised row was)."""
        if not self.steps:
            return {}
        problems = {PREFIX + "ignored_batches": float(self.ignored_batches),
                    PREFIX + "nonfinite_gaps": float(self.nonfinite_gaps)}
        if not self.tokens:
            return problems
        n = self.tokens
        finite = n - self.nonfinite_gaps
        return {
            PREFIX + "mean_weight": self.weight_sum / n,
            PREFIX + "share_alpha": self.at_alpha / n,
            PREFIX + "share_beta": self.at_beta / n,
            PREFIX + "mean_gap": self.gap_sum / finite if finite else math.nan,
            PREFIX + "share_contrasted": self.contrasted / n,
            PREFIX + "tokens": float(n),
            **problems,
        }

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(counts [bins], edges [bins + 1])`` of the gaps since the last reset, or None."""
        if self.tokens <= self.nonfinite_gaps or self.edges is None:  # edges: set by the first CAL step
            return None
        return self.counts.clone(), self.edges.clone()


class CALLoggingCallback(_CallbackBase):
    """HF `TrainerCallback` that reports `CALStats` with every Trainer log.

    Registers its `CALStats` when training begins and unregisters it when training ends. The
    scalars go into every training log (and ``trainer.state.log_history``). Reporters see them
    when this callback runs before theirs, and the gap histogram needs to find the TensorBoard /
    wandb callbacks: `attach` sets both up. Passed as ``callbacks=[CALLoggingCallback()]`` it
    still fills ``log_history`` but runs after the reporters and writes no histogram.
    """

    def __init__(self, stats: CALStats | None = None, histogram: bool = True):
        if _CallbackBase is object:  # pragma: no cover
            raise ImportError("CALLoggingCallback needs transformers installed")
        self.stats = stats or CALStats()
        self.histogram = histogram
        self.handler = None            # set by `attach`; used to find TensorBoard / wandb writers
        self.last_histogram = None
        self.loss_owner = None         # set by `attach`: whose compute_loss makes the training loss

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.reset()
        self.stats.register()
        self._first_step = "pending"  # -> "started" (counts taken) -> "checked"

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if getattr(self, "_first_step", None) == "pending":
            self._first_step, self._before = "started", _loss_use(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if getattr(self, "_first_step", None) != "started":
            return
        self._first_step = "checked"
        check_first_step(model, self._before, args, owner=self.loss_owner)

    def on_train_end(self, args, state, control, **kwargs):
        self.stats.unregister()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or ("loss" not in logs and not any(k.startswith("train") for k in logs)):
            return  # an evaluation log: CAL statistics describe training steps only
        # Every rank reaches this point for the same log (the Trainer logs on all ranks), so
        # the collective is safe here, and must come before any return that depends on this
        # rank's own statistics.
        self.stats.reduce_over_ranks()
        scalars = self.stats.scalars()
        if not scalars:
            return
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        hist = self.stats.histogram()
        self.last_histogram = hist
        if self.histogram and hist is not None and state.is_world_process_zero:
            self._write_histogram(hist, state.global_step)
        self.stats.reset()

    def _write_histogram(self, hist, step: int) -> None:
        counts, edges = hist
        for cb in getattr(self.handler, "callbacks", ()):
            name = type(cb).__name__
            if name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                s = self.stats
                cb.tb_writer.add_histogram_raw(
                    PREFIX + "gap", min=s.gap_min, max=s.gap_max, num=s.tokens - s.nonfinite_gaps,
                    sum=s.gap_sum, sum_squares=s.gap_sq_sum, bucket_limits=edges[1:].tolist(),
                    bucket_counts=counts.tolist(), global_step=step)
                cb.tb_writer.flush()
            elif name == "WandbCallback" and getattr(cb, "_wandb", None) is not None \
                    and getattr(cb._wandb, "run", None) is not None:
                cb._wandb.log({PREFIX + "gap": cb._wandb.Histogram(
                    np_histogram=(counts.numpy(), edges.numpy()))}, commit=False)


def put_first(handler, callback: CALLoggingCallback) -> None:
    """Make ``callback`` the first of ``handler``'s callbacks (adding it when absent), so that the
    ``cal/`` keys it adds to a log reach the printer, the log files and every reporter after it,
    and let it find the TensorBoard / wandb writers for its histogram. Safe while the handler
    iterates its callbacks (an adapter moving itself from ``on_train_begin``): the callback moves
    from index i to 0, and the ones after it keep their index."""
    if callback in handler.callbacks:
        handler.callbacks.remove(callback)
    handler.callbacks.insert(0, callback)
    callback.handler = handler


def attach(trainer, histogram: bool = True) -> CALLoggingCallback:
    """Add a `CALLoggingCallback` to ``trainer`` ahead of its reporting callbacks; returns it."""
    callback = CALLoggingCallback(histogram=histogram)
    callback.loss_owner = loss_owner(trainer)
    put_first(trainer.callback_handler, callback)
    return callback


# -- options that bypass CAL ----------------------------------------------------------------------


def refuse_bypasses(trainer) -> None:
    """Refuse, before training, a built trainer whose options would take the labels out of the
    model call or replace the loss the model returns, naming the option: the HF Trainer's
    ``label_smoothing_factor`` and ``compute_loss_func`` (both pop ``labels`` before calling the
    model, so calplug's forward never runs its step), and each registered framework's own
    (`Framework.check_trainer`: TRL's ``loss_type``, Liger's loss kernels). What no option names
    (a custom ``compute_loss``) is caught at the first step by `CALLoggingCallback`."""
    args = getattr(trainer, "args", None)
    smoothing = getattr(args, "label_smoothing_factor", 0) or 0
    if smoothing:
        raise CALConfigError(
            f"CAL cannot run with label_smoothing_factor={smoothing}: the Trainer's label smoother "
            "takes the labels out of the model call and computes a smoothed cross-entropy from the "
            "logits, so calplug's forward never runs its step and the loss is the plain model's. "
            "Set label_smoothing_factor=0, or turn CAL off")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise CALConfigError(
            "CAL cannot run with the Trainer's compute_loss_func: the Trainer takes the labels out "
            "of the model call and computes that function's loss from the logits, so calplug's "
            "forward never runs its step. Build the trainer without compute_loss_func (the model's "
            "loss is then the CAL loss), or turn CAL off")
    for framework in plugins.frameworks():
        if framework.check_trainer is not None:
            framework.check_trainer(trainer)


def loss_owner(trainer) -> str:
    """Whose ``compute_loss`` makes ``trainer``'s training loss, for the first-step error."""
    method = getattr(trainer, "compute_loss", None)
    function = getattr(method, "__func__", method)
    name = getattr(function, "__qualname__", None) or type(trainer).__name__
    return f"{type(trainer).__name__} (compute_loss: {name})"


def _loss_use(model):
    """``(CAL steps with a gradient, of those reached by a backward)`` on the enabled model
    inside ``model``; None when no enabled model is found."""
    if model is None:
        return None
    from .enabling import unwrap_model

    state = unwrap_model(model).__dict__.get(STATE_ATTR)
    return None if state is None else (state.loss_use.steps, state.loss_use.backwards)


def check_first_step(model, before, args=None, owner: str | None = None) -> None:
    """After the first optimiser step: the CAL step ran, and a backward pass went through its
    loss. Raises `CALConfigError` naming what bypassed CAL otherwise. ``before`` is
    ``_loss_use(model)`` at the step's start (None: CAL was enabled during the step)."""
    from .enabling import unwrap_model

    after = _loss_use(model)
    if model is None:
        return
    inner = unwrap_model(model)
    who = owner or "the trainer"
    if after is None:
        raise CALConfigError(
            f"the first training step ran, but the model it trained ({type(inner).__name__}) has "
            "no CAL enabled: calplug.enable was called on another model object, or the model was "
            "replaced after it (a trainer or kernel library that reloads or re-wraps the model). "
            "Enable CAL on the model the trainer trains: calplug.trainer.enable_for_trainer(trainer)")
    steps = after[0] - (before[0] if before else 0)
    backwards = after[1] - (before[1] if before else 0)
    if steps == 0:
        forward = inner.__dict__.get("forward")
        if forward is not None and type(forward).__name__ != "CALForward":
            cause = (f"the model's forward was replaced after calplug.enable (now "
                     f"{getattr(forward, '__qualname__', type(forward).__name__)}): a kernel "
                     "library (Liger's fused cross-entropy, Unsloth) or the trainer patched it. "
                     "Apply such patches first, then enable CAL, or switch them off")
        else:
            causes = []
            if getattr(args, "label_smoothing_factor", 0):
                causes.append(f"label_smoothing_factor={args.label_smoothing_factor}")
            cause = (f"{who} called the model without labels (or in eval mode) and computed the "
                     "training loss itself" + (f"; set here: {', '.join(causes)}" if causes else "")
                     + ". Label smoothing, a compute_loss_func and a compute_loss that pops the "
                     "labels all do this: let the model receive the labels and return its loss "
                     "(the CAL loss)")
        raise CALConfigError(
            f"CAL was bypassed: the first training step ran no CAL step on {type(inner).__name__}, "
            f"so the loss it optimised is not CAL's. Cause: {cause}")
    if backwards == 0:
        raise CALConfigError(
            f"CAL was bypassed: the first training step ran {steps} CAL step(s), but no backward "
            f"pass went through the CAL loss the model returned: {who} computed its own loss from "
            "the model's outputs and discarded the model's, so CAL's weights had no effect. Return "
            "the model's loss (outputs.loss) from compute_loss, or turn CAL off")


# -- trainers -------------------------------------------------------------------------------------


def use_model_loss(trainer) -> bool:
    """Make ``trainer`` optimise the loss its model returns (the CAL loss): for the trainers a
    registered framework lists as computing their own loss (`Framework.own_loss_trainers`: TRL's
    SFTTrainer), this instance's ``compute_loss`` becomes transformers' ``Trainer.compute_loss``
    (which passes ``num_items_in_batch`` to the model and, with
    ``average_tokens_across_devices``, multiplies by the number of processes, as TRL does). The
    trainer's own extra training metrics (TRL's entropy, token accuracy) are then not logged.
    Returns whether anything was changed."""
    import types

    from transformers import Trainer

    own_loss = [name for f in plugins.frameworks() for name in f.own_loss_trainers]
    if not is_named(trainer, own_loss):
        return False
    trainer.compute_loss = types.MethodType(Trainer.compute_loss, trainer)
    return True


def enable_for_trainer(trainer, config=None, *, log: bool = True, histogram: bool = True,
                       **overrides) -> CALLoggingCallback | None:
    """One call for an HF `Trainer` or TRL `SFTTrainer` that is already built:
    `refuse_bypasses` (options that would bypass the CAL loss are refused, naming them),
    ``calplug.enable(trainer.model, config, **overrides)`` (through PEFT and other wrappers),
    `use_model_loss`, and (``log=True``) `attach` a `CALLoggingCallback`, which is returned and
    which also checks, after the first optimiser step, that the CAL step ran and its loss reached
    the backward pass (it raises, naming the likely cause, when not).

    Call it after constructing the trainer: TRL's SFTTrainer replaces the model's ``forward``
    while it is built, and calplug must wrap the forward the model finally has."""
    from .enabling import enable

    refuse_bypasses(trainer)
    enable(trainer.model, config, **overrides)
    use_model_loss(trainer)
    return attach(trainer, histogram=histogram) if log else None
