"""The paper's contrast ablations (patch masking, blur) by their definitions, for the tests to
compare calplug with (tests/test_ablations.py, test_family_calls.py, test_llava_style.py).

* ``patch_mask``: the published mask contrast over a seeded subset of the image positions
  (`hidden_positions`: which ones, as docs/ablations.md states the rule), by
  `calplug.reference.reference_forwards`.
* ``blur``: the model's own whole forward on blurred pixels (`calplug.reference.reference_blur`,
  `reference_pixel_forwards`): no hook, no re-run of the vision path.
"""
from __future__ import annotations

import functools

import torch

import calplug
from calplug.reference import (reference_at, reference_blur, reference_forwards,
                               reference_pixel_forwards)
from _close import assert_grads_rel_close, grads


def hidden_positions(visual: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """bool ``[B, L]``: the image positions ``patch_mask`` hides (docs/ablations.md): per sample,
    in batch order, the first ``round(ratio * n)`` of a permutation of its ``n`` image positions
    drawn with ``torch.randperm`` from one CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().squeeze(1)
        n_hide = int(round(ratio * positions.numel()))
        if n_hide:
            chosen = torch.randperm(positions.numel(), generator=gen)[:n_hide]
            hidden[b, positions[chosen.to(positions.device)]] = True
    return hidden


def patch_mask_forwards(model, batch, visual, ratio, seed, decoder):
    return reference_forwards(model, batch, hidden_positions(visual, ratio, seed), "mask",
                              decoder=decoder)


def blur_forwards(model, batch, sigma, keys, labels=None):
    return reference_pixel_forwards(model, batch, functools.partial(reference_blur, sigma=sigma), keys,
                                    labels)


def check_against(model, batch, forwards, setting, gradients=True, gap_atol=1e-6, labels=None,
                  **contrast):
    """One faithful-style CAL step with ``contrast`` (flat pooling, ``setting`` = alpha, beta,
    window) against the reference loss, gaps and weights of ``forwards``, and every gradient
    when ``gradients``. ``labels``: those of the decoder sequence where the model builds its own
    (LLaVA codebases' splice; default: the batch's). Returns calplug's gaps (calplug left
    disabled)."""
    alpha, beta, window = setting
    labels = batch["labels"] if labels is None else labels
    ref_loss, ref_gaps, ref_weights = reference_at(forwards, labels, alpha, beta, window)
    ref_grads = {}
    if gradients:
        model.zero_grad()
        ref_loss.backward(retain_graph=True)  # other settings use the same forwards
        ref_grads = grads(model)
        model.zero_grad()
    with calplug.enabled(model, pool_scope="flat", alpha=alpha, beta=beta, pool_window=window, **contrast):
        out = model(**batch)
    if gradients:
        out.loss.backward()
        assert_grads_rel_close(grads(model), ref_grads, 1e-5)
        model.zero_grad()
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.cal_gaps.reshape(-1), ref_gaps, rtol=1e-5, atol=gap_atol)
    torch.testing.assert_close(out.cal_weights.reshape(-1), ref_weights, rtol=1e-5, atol=gap_atol)
    return out.cal_gaps.detach()
