"""calplug's own behaviour, registered on the plugin manager like any third-party plugin."""
from __future__ import annotations

from . import contrast
from .hookspecs import hookimpl
from .loss import weighted_cross_entropy
from .weighting import clamp_and_pool


@hookimpl
def calplug_contrasts():
    return {
        "mask": contrast.mask_contrast,
        "drop": contrast.drop_contrast,
        "patch_mask": contrast.patch_mask_contrast,
        "blur": contrast.blur_contrast,
    }


@hookimpl(trylast=True)
def calplug_weights(delta, supervised, config):
    return clamp_and_pool(delta, supervised, alpha=config.alpha, beta=config.beta,
                          window=config.pool_window, scope=config.pool_scope)


@hookimpl(trylast=True)
def calplug_loss(logits, labels, weights, num_items_in_batch):
    return weighted_cross_entropy(logits, labels, weights, num_items_in_batch)
