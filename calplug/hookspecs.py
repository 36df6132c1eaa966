"""The hooks through which calplug is extended (pluggy, project name ``calplug``).

Every hook is a plain documented function; implementations take only the keyword arguments they
need (pluggy passes by name, so arguments can be added later without breaking a plugin).
calplug's own behaviour is registered as plugins on the same manager (see `calplug.plugins`), so a
third-party plugin loaded from the ``calplug`` entry-point group is an equal: later-registered
implementations run first, so for `firstresult` hooks a plugin overrides the built-in answer by
returning something other than None.

Order of a CAL training step: integration main pass -> `calplug_contrasts` condition -> target
gaps (core) -> `calplug_weights` -> `calplug_loss` -> `calplug_observe_step`.
"""
from __future__ import annotations

import pluggy

PROJECT = "calplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- model knowledge ------------------------------------------------------------------------------
@hookspec
def calplug_integrations():
    """Return a list of `calplug.integration.Integration` objects this plugin provides.

    Called when `calplug.enable` looks for the integration that can patch a model. An
    `Integration` names the model classes it supports (for error messages), decides whether it
    matches a model instance, and knows how to run that model's main pass and report where the
    image positions are. Integrations hold model knowledge and no CAL math.
    """


# -- the contrast condition -----------------------------------------------------------------------
@hookspec
def calplug_contrasts():
    """Return a dict ``{name: build_contrast}`` of contrast conditions this plugin provides.

    ``build_contrast(main, config)`` receives the `calplug.integration.MainPass` of the step and the
    `CALConfig`, and returns a `calplug.contrast.ContrastPlan` (the decoder keyword arguments of
    the no-grad "without the image" pass, and which contrast row stands for each main row), or
    None when there is nothing to contrast (every gap is 0). ``config.contrast`` selects a name;
    names are validated against the union of all plugins' dicts.
    """


# -- gap -> weight -> loss ------------------------------------------------------------------------
@hookspec(firstresult=True)
def calplug_weights(delta, labels, supervised, config):
    """Turn target-token gaps into per-row loss weights; the first non-None answer wins.

    delta:      float32 ``[B, L-1]`` gap of each shifted row (row i predicts token i+1), computed
                on token 0 where the label is ignored, 0 where there was nothing to contrast.
    labels:     long ``[B, L-1]`` shifted labels (ignore index -100 kept).
    supervised: bool ``[B, L-1]`` rows that enter the loss.
    config:     the `CALConfig`.
    Return float32 ``[B, L-1]`` weights (no gradient is taken through them). The built-in
    implementation clamps to ``[alpha, beta]`` and average-pools (`calplug.weighting`).
    """


@hookspec(firstresult=True)
def calplug_loss(logits, labels, weights, config, num_items_in_batch):
    """Return the scalar training loss; the first non-None answer wins.

    logits:  ``[B, L, V]`` main-pass logits exactly as the model produced them (do not copy).
    labels:  long ``[B, L]`` unshifted labels aligned with ``logits``.
    weights: float32 ``[B, L-1]`` from `calplug_weights`.
    num_items_in_batch: the HF Trainer's token count over the whole accumulated batch, or None.
    The built-in implementation is the spec's weighted, normalised cross-entropy (`calplug.loss`).
    """


# -- observation ----------------------------------------------------------------------------------
@hookspec
def calplug_observe_step(model, delta, weights, labels, supervised, config):
    """Called after every CAL training step with that step's gaps, weights and shifted labels.

    For logging, histograms and pictures. Tensors are detached; do not modify them. Return
    values are ignored.
    """
