"""`calplug.token_gaps(model, batch)`: how much the image raised each token of a batch, outside
training. The one contrast machinery's entry point for ``calplug inspect``, ``calplug verify``,
the dataset audit and contrastive decoding.

It runs exactly what a CAL training step runs for steps 1-6 (the integration's main pass, the
configured contrast pass of `calplug.contrast_pass`, the weighting hook), without grad and
without a loss, on a model that is enabled or not: an enabled model's config, integration and
contrast are used, otherwise ``config`` (or the defaults) and the integration that matches.
With ``log_probs=True`` it also gives each target's log-probability with and without the image,
so scores are comparable across tokens (a raw logit gap is not: a token whose logits all rise
has a high gap and no gain).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from . import batch_checks, contrast_pass, enabling, gap, plugins
from .config import resolve_config
from .errors import CALInputError
from .hookspecs import Contrast, Integration, MainPass
from .step import STATE_ATTR, original_forward


@dataclasses.dataclass
class TokenGaps:
    """Per-token results for a batch; ``[B, L-1]`` tensors are shifted rows (row i predicts token
    i + 1 of the decoder sequence), as the training step's ``cal_gaps`` / ``cal_weights``.

    gaps:          float32 logit of the target with the image minus without it (0 where the row
                   had no contrast value: a sample without an image, or no text before it).
    contrasted:    bool: the rows that got a contrast value.
    supervised:    bool: rows whose label is not -100.
    labels:        long shifted labels (-100 kept).
    weights:       float32 CAL loss weights of the config (clamp and pool, or a plugin's).
    main_logits:   float32 target logit with the image.
    log_prob_with / log_prob_without: float32 log-probability of the target with and without the
                   image (``log_probs=True``; None otherwise); equal where not contrasted.
    visual:        bool ``[B, L]`` image positions of the decoder sequence.
    with_image:    bool ``[B]`` samples the image reaches.
    config:        the `CALConfig` used.
    """

    gaps: torch.Tensor
    contrasted: torch.Tensor
    supervised: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    main_logits: torch.Tensor
    visual: torch.Tensor
    with_image: torch.Tensor
    config: object
    log_prob_with: torch.Tensor | None = None
    log_prob_without: torch.Tensor | None = None

    @property
    def log_prob_gain(self) -> torch.Tensor:
        """float32 ``log p(target | image) - log p(target | without it)`` (0 where not contrasted)."""
        if self.log_prob_with is None:
            raise CALInputError("log-probability gains need token_gaps(..., log_probs=True)")
        return self.log_prob_with - self.log_prob_without


def resolved(model: nn.Module, config=None, **overrides):
    """``(target, config, integration, contrast, forward)`` for scoring ``model``: an enabled
    model's own (``config`` / ``overrides`` replace its config for this call), else the
    integration that matches and the contrast ``config`` names. ``forward`` is the forward the
    model had before calplug, which the integration's main pass calls."""
    target = enabling.unwrap_model(model)
    state = target.__dict__.get(STATE_ATTR)
    if state is not None:
        cfg = resolve_config(state.config if config is None else config, **overrides)
        integration, contrast = enabling.resolve(target, cfg, state.integration)
        return target, cfg, integration, contrast, original_forward(target, state)
    cfg = resolve_config(config, **overrides)
    integration, contrast = enabling.resolve(target, cfg)
    return target, cfg, integration, contrast, target.forward


def main_pass(target: nn.Module, integration: Integration, forward, batch: dict) -> MainPass:
    """The integration's main pass on ``batch`` (the forward's keyword arguments, ``labels``
    included), its labels checked as the training step checks them."""
    if not isinstance(batch, dict):
        raise CALInputError(f"token_gaps takes the batch as a dict of forward arguments, got "
                            f"{type(batch).__name__}")
    if batch.get("labels") is None:
        raise CALInputError("token_gaps needs labels (the targets whose gaps it measures): pass "
                            "the training batch, labels included (-100 where no loss is wanted)")
    batch_checks.check_labels(batch["labels"])
    main = integration.main_pass(target, forward, dict(batch))
    batch_checks.check_label_values(main.labels, vocab=main.logits.shape[-1])
    return main


@torch.no_grad()
def token_gaps(model: nn.Module, batch: dict, config=None, *, log_probs: bool = False,
               **overrides) -> TokenGaps:
    """Per-token gaps, weights and (``log_probs=True``) log-probabilities with and without the
    image for one collated ``batch`` (a training batch: the forward's keyword arguments, labels
    included). No grad, no loss, the model's train/eval mode as it is (call ``model.eval()`` for
    dropout-free scores). ``config`` / ``overrides`` as `calplug.enable` takes them."""
    target, cfg, integration, contrast, forward = resolved(model, config, **overrides)
    main = main_pass(target, integration, forward, batch)
    return _score(target, main, cfg, contrast, log_probs)


def _score(target: nn.Module, main: MainPass, cfg, contrast: Contrast, log_probs: bool) -> TokenGaps:
    shifted, targets, supervised = gap.shift_targets(main.labels)
    main_logits = gap.main_target_logits(main.logits, targets)
    gaps, contrasted, lse = contrast_pass.measure(target, main, cfg, contrast, main_logits, targets,
                                                  log_softmax=log_probs)
    weighed = torch.where(torch.isfinite(gaps), gaps, torch.zeros_like(gaps))
    weights = plugins.get_plugin_manager().hook.calplug_weights(
        gaps=weighed, labels=shifted, supervised=supervised, config=cfg)
    result = TokenGaps(gaps, contrasted, supervised, shifted, weights, main_logits,
                       main.visual_mask, main.with_image, cfg)
    if log_probs:
        main_lse = gap.logits_lse(main.logits)
        result.log_prob_with = main_logits - main_lse
        without = (main_logits - gaps) - lse
        result.log_prob_without = torch.where(contrasted, without, result.log_prob_with)
    return result


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout probability 0 for the block (``nn.Dropout`` modules, float ``*dropout``
    attributes that attention modules read in training, and the ``drop_prob`` of stochastic-depth
    modules: transformers' and timm's DropPath, e.g. Qianfan-OCR's vision tower at its default
    0.1), restored after: scores and checks of the network itself, in training mode (some
    forwards build other masks in eval mode)."""
    changed = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            changed.append((module, "p", module.p))
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ((name.endswith("dropout") or name == "drop_prob") and isinstance(value, float)
                    and value > 0):
                changed.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in changed:
            setattr(module, name, value)


@contextlib.contextmanager
def network_mode(model: nn.Module) -> Iterator[None]:
    """Training mode with dropout off for the block, the model's mode restored after: scores of
    the network itself as a training step sees it (``calplug inspect``, the audit)."""
    was_training = model.training
    model.train()
    try:
        with dropout_off(model):
            yield
    finally:
        model.train(was_training)
