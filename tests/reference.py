"""The CAL loss written straight from the algorithm of docs/cal.md (steps 3-7), independent of calplug's code.

Tests compute the two full-logit passes their own (model-specific) way and hand them here:
``logits`` from the usual forward, ``logits_wo`` from the same inputs with attention to image
positions masked. Everything is float32 and uses full ``[B, L, V]`` logits on purpose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_weights(logits, logits_wo, labels, alpha=1.0, beta=5.0, window=3):
    """Steps 3-6: flat ``[N]`` weights and gaps, N = B * (L - 1)."""
    V = logits.shape[-1]
    s_logits = logits[:, :-1].reshape(-1, V).float()
    s_logits_wo = logits_wo[:, :-1].reshape(-1, V).float()
    s_labels = labels[:, 1:].reshape(-1)
    y = s_labels.clone()
    y[y == -100] = 0
    rows = torch.arange(y.numel())
    delta = s_logits[rows, y] - s_logits_wo[rows, y]
    w = delta.clamp(min=alpha, max=beta)
    if window > 1:
        w = F.avg_pool1d(w.view(1, 1, -1), kernel_size=window, stride=1, padding=window // 2,
                         count_include_pad=False).view(-1)
    return w.detach(), delta.detach()


def reference_cal_loss(logits, logits_wo, labels, alpha=1.0, beta=5.0, window=3):
    """Step 7: ``sum(ce * w) / (sum_{not ignored} w + 1e-6)``."""
    V = logits.shape[-1]
    w, _ = reference_weights(logits, logits_wo, labels, alpha, beta, window)
    s_logits = logits[:, :-1].reshape(-1, V).float()
    s_labels = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(s_logits, s_labels, ignore_index=-100, reduction="none")
    valid = s_labels != -100
    return (ce * w).sum() / (w[valid].sum() + 1e-6)


def assert_rel_close(actual, expected, rel=1e-5, name="", atol=1e-8):
    """``||actual - expected|| <= rel * ||expected||``: relative error of a whole tensor (loss or
    gradient), the measure the issues' "to 1e-5 relative" means; elementwise checks would fail on
    gradient entries that cancel to ~0, where fp32 summation order alone moves the last digits.
    ``atol`` covers gradients that are zero in exact arithmetic (a key-projection bias)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).norm().item()
    scale = expected.norm().item()
    assert err <= rel * scale + atol, f"{name}: relative error {err / max(scale, 1e-30):.3g} > {rel}"


def grads(model):
    """Every parameter gradient of ``model``, cloned, by name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_rel_close(actual: dict, expected: dict, rel=1e-5, atol=1e-8):
    """Same parameters got gradients, and each agrees to ``rel`` (see `assert_rel_close`)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_rel_close(actual[name], expected[name], rel, name, atol=atol)
