"""calplug's own behaviour, registered on the plugin manager like any third-party plugin."""
from __future__ import annotations

from . import contrast
from .hookspecs import Contrast, hookimpl
from .loss import chunked_weighted_cross_entropy, weighted_cross_entropy
from .weighting import clamp_and_pool

CONTRASTS = [
    Contrast("mask", contrast.mask_contrast),
    Contrast("drop", contrast.drop_contrast),
    Contrast("patch_mask", contrast.patch_mask_contrast),
    Contrast("blur", contrast.blur_contrast, needs_pixels=True),
    Contrast("noise", contrast.noise_contrast, needs_pixels=True),
]


@hookimpl
def calplug_contrasts():
    return CONTRASTS


@hookimpl(trylast=True)
def calplug_weights(gaps, supervised, config):
    return clamp_and_pool(gaps, supervised, alpha=config.alpha, beta=config.beta,
                          window=config.pool_window, scope=config.pool_scope)


@hookimpl(trylast=True)
def calplug_loss(logits, labels, weights, config, num_items_in_batch, hidden_states, lm_head):
    if hidden_states is None:
        return weighted_cross_entropy(logits, labels, weights, num_items_in_batch)
    return chunked_weighted_cross_entropy(hidden_states, lm_head.weight, getattr(lm_head, "bias", None),
                                          labels, weights, config.loss_chunk, num_items_in_batch)
