"""Every way calplug can be extended: the pluggy hooks (project name ``calplug``) and the typed
records they exchange (`Integration`, `MainPass`, `Contrast`, `ContrastPlan`).

Each hook is a plain documented function; implementations take only the keyword arguments they
need (pluggy passes by name, so arguments can be added later without breaking a plugin).
calplug's own behaviour is registered as plugins on the same manager (`calplug.plugins`), so a
third-party plugin loaded from the ``calplug`` entry-point group is an equal: later-registered
implementations run first, so for `firstresult` hooks a plugin overrides the built-in answer by
returning something other than None.

A CAL training step (`calplug.step`; the algorithm's steps are numbered in docs/cal.md) calls
them in this order: the matching `Integration`'s main pass (step 1) -> the selected `Contrast`
builds the contrast pass (step 2) -> target gaps (steps 3-4, core) -> `calplug_weights`
(steps 5-6) -> `calplug_loss` (step 7) -> `calplug_observe_step`. How to write each kind of
plugin: docs/plugins.md.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from .classes import is_named

if TYPE_CHECKING:  # annotations only: importing the hooks costs no torch import
    import torch
    from torch import nn

    from .config import CALConfig

PROJECT = "calplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# The forward argument an adapter adds when it hands an enabled model pre-merged ``inputs_embeds``
# (the images already spliced in, no ``input_ids``): bool ``[B, L]``, True at image and video
# positions. The enabled forward takes it out of the call: the model never receives it.
VISUAL_MASK_ARGUMENT = "calplug_visual_mask"


# -- records ----------------------------------------------------------------------------------
@dataclasses.dataclass
class MainPass:
    """What an integration's main pass (step 1) hands the engine. Complete when `main_pass`
    returns: the engine reads nothing from the model itself.

    output:          what the model's own forward returned, computed without its own loss.
    logits:          ``[B, L, V]`` logits of that forward, as produced (never copied); with
                     ``loss_chunk > 0`` only the last position's ``[B, 1, V]``.
    labels:          long ``[B, L]`` labels aligned with the decoder sequence (-100 = ignored).
    decoder:         the text decoder module (its output's first item is the final hidden state).
    lm_head:         the output projection (``weight [V, d]``, optional ``bias``).
    decoder_kwargs:  the keyword arguments the decoder received in the main pass.
    visual_mask:     bool ``[B, L]``, True at image (or video) positions of the decoder sequence
                     (all False for a model whose image does not sit at positions of the sequence:
                     cross-attention, an encoder's output).
    attention_mask:  ``[B, L]`` 2-D padding mask the decoder received (ones when it got none).
    position_ids:    the positions the decoder really used, explicit (``[B, L]`` or ``[k, B, L]``).
    visual_extras:   decoder keyword arguments that only carry visual information (Qwen3-VL's
                     deepstack features); a contrast that removes image positions clears them.
    image_samples:   bool ``[B]``: the samples the image reaches. None (the default) means the
                     samples with a visual position; a model whose image enters elsewhere
                     (cross-attention states, an encoder's output) sets it.
    image_free:      the rest of the image-blind pass, for images that do not (only) sit at
                     ``visual_mask`` positions: ``fn(samples: long [S]) -> dict`` of decoder
                     keyword arguments for those samples without the image, computed by the
                     integration with the model's own modules and no grad (cross-attention states
                     dropped, an encoder re-run on the text alone). The contrast pass uses them in
                     place of the main pass's. None: the sequence positions are all there is.
    rerun_with_pixels: ``fn(pixel_transform) -> dict`` of decoder keyword arguments (merged
                     ``inputs_embeds``, cross-attention states, ...) from re-running the model's own
                     vision path on transformed pixels (no grad), for contrasts with
                     ``needs_pixels``; set by integrations with ``pixel_contrasts`` whenever the
                     micro-batch has pixels, None otherwise.
    extra_loss:      a scalar the model adds to its language-model loss and that training must
                     keep, coefficient applied (a mixture-of-experts router's load-balancing
                     loss); the engine adds it to the CAL loss. None when there is none.
    logit_transform: an elementwise function the model applies to ``lm_head``'s output to make its
                     logits (scaling, soft-capping: `calplug.gap.LogitTransform`, whose
                     ``full_logits`` also cuts a padded vocabulary); the engine applies it to the
                     contrast side's target logits too, so both sides of a gap are the same kind
                     of logit. None when the logits are ``lm_head``'s output. The first training
                     step checks it (`calplug.contrast_pass.check_head`).
    sequence_kwargs: decoder keyword arguments laid out ``[B, L, ...]`` along the sequence besides
                     ``inputs_embeds`` (Gemma's per-layer inputs): a contrast that shortens the
                     sequence (``drop``) gathers them like the embeddings.
    attention_span:  the shortest sliding window / attention chunk of the decoder, which its layers
                     count in sequence (and cache) positions; None when there is none. ``drop``
                     equals ``mask`` only on sequences no longer than it, unless the decoder
                     receives ready 4-D masks (``drop`` slices them); a decoding cache evicts by
                     it either way (`calplug.decoding`).
    prefix_rows:     rows the model's forward puts in front of the sequence ``labels`` align with
                     (GIT prepends its image's embeddings inside the model): the output
                     projection's input has them, ``logits`` here starts after them, and the
                     logit self-check and ``loss_chunk`` skip them in what the projection received.
    """

    output: Any
    logits: "torch.Tensor"
    labels: "torch.Tensor"
    decoder: "nn.Module"
    lm_head: "nn.Module"
    decoder_kwargs: dict
    visual_mask: "torch.Tensor"
    attention_mask: "torch.Tensor"
    position_ids: "torch.Tensor"
    visual_extras: tuple[str, ...] = ()
    image_samples: "torch.Tensor | None" = None
    image_free: Callable[["torch.Tensor"], dict] | None = None
    rerun_with_pixels: Callable[[Callable[["torch.Tensor"], "torch.Tensor"]], dict] | None = None
    extra_loss: "torch.Tensor | None" = None
    logit_transform: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    sequence_kwargs: tuple[str, ...] = ()
    attention_span: int | None = None
    prefix_rows: int = 0

    @property
    def inputs_embeds(self) -> "torch.Tensor":
        return self.decoder_kwargs["inputs_embeds"]

    @property
    def with_image(self) -> "torch.Tensor":
        """bool ``[B]``: the samples the image reaches (`image_samples`, else those with a visual
        position the text can attend to): the samples a contrast pass has something to take away
        from. An image whose positions are all padding (attention mask 0) reaches no token: the
        placeholder image LLaMA-Factory appends to a text-only batch, masked out, so that every
        rank runs the vision tower under ZeRO-3, leaves its sample text-only (gap 0, no contrast),
        where contrasting it would only measure round-off."""
        if self.image_samples is not None:
            return self.image_samples
        return (self.visual_mask & self.attention_mask.bool()).any(1)

    @property
    def found_image(self) -> "torch.Tensor":
        """bool ``[B]``: the samples where an image was found at all (attended or not), for the
        report of steps that carry images but never find one (`calplug.guards`)."""
        return self.visual_mask.any(1) if self.image_samples is None else self.image_samples


@dataclasses.dataclass
class Integration:
    """A model family calplug can patch: model knowledge, no CAL math.

    name:             short name (``"transformers-llava"``).
    model_classes:    class names this integration patches; a model matches when one of them is in
                      its class's MRO (no upstream import needed), and the names are listed in the
                      error for unsupported models.
    main_pass:        ``fn(model, original_forward, kwargs) -> MainPass``: runs the model's own
                      forward on ``kwargs`` (the forward's keyword arguments, ``labels`` included)
                      and returns a complete `MainPass`.
    decoder_and_head: optional ``fn(model) -> (decoder, lm_head)``: where the text decoder and the
                      output projection live, before any forward runs. ``loss_chunk`` needs it
                      (it hooks the head); without it that setting is refused.
    check:            optional ``fn(model)`` run by `calplug.enable`; raises
                      `UnsupportedModelError` for versions or configurations it cannot handle.
    pixel_contrasts:  whether `main_pass` fills `MainPass.rerun_with_pixels` when the micro-batch
                      has pixels, so that contrasts with ``needs_pixels`` (blur) can run.
    accepts:          optional ``fn(model) -> bool``: matches models beyond ``model_classes`` (a
                      generic integration); ``check`` then decides, or refuses with the reason.
    contrast_refusal: optional ``fn(model, contrast_name) -> str | None``: why this model cannot
                      run that contrast (None: it can); `calplug.enable` raises with the reason.
    support_status:   optional ``fn(model) -> (status, reason) | None``: how calplug's own tests
                      back this model's class ("proven", "matched", "refused" and why), which
                      ``calplug verify`` prints (the support matrix asks with the class itself,
                      no model built). None: the integration does not say.
    reference_pass:   optional ``fn(model, batch) -> ReferencePass``, for a model whose image is
                      not only at positions of its decoder sequence: how the independent
                      reference (`calplug.reference`, which ``calplug verify`` runs) takes the image
                      out. None: it hides the `MainPass.visual_mask` positions.
    decoding_refusal: optional ``fn(model) -> str | None``: why contrastive decoding
                      (`calplug.contrastive_generate`) cannot run this model (None: it can);
                      raised as `UnsupportedModelError` before ``generate`` runs, naming the class.
    """

    name: str
    model_classes: tuple[str, ...]
    main_pass: Callable[["nn.Module", Callable, dict], MainPass]
    decoder_and_head: Callable[["nn.Module"], "tuple[nn.Module, nn.Module]"] | None = None
    check: Callable[["nn.Module"], None] | None = None
    pixel_contrasts: bool = False
    accepts: Callable[["nn.Module"], bool] | None = None
    contrast_refusal: Callable[["nn.Module", str], "str | None"] | None = None
    support_status: Callable[["nn.Module"], "tuple[str, str] | None"] | None = None
    reference_pass: Callable[["nn.Module", dict], "ReferencePass"] | None = None
    decoding_refusal: Callable[["nn.Module"], "str | None"] | None = None

    def matches(self, model: "nn.Module") -> bool:
        if is_named(model, self.model_classes):
            return True
        return self.accepts is not None and bool(self.accepts(model))


@dataclasses.dataclass
class ReferencePass:
    """How the independent reference (`calplug.reference.reference_image_free_step`) runs the
    model without the image, for a model whose image is not (only) at positions of its decoder
    sequence. Model facts only: the reference's arithmetic is its own.

    batch:       keyword arguments of its second forward (the batch without the arguments that
                 carry the image: a cross-attention model's pixels and cross-attention mask).
    hooks:       ``((module, pre_hook), ...)``: forward pre-hooks (``with_kwargs=True``) installed
                 during that forward (an encoder run on the text alone: its image positions
                 hidden from it and from the decoder's cross-attention; its pixel arguments left
                 out), built with `calplug.reference`'s helpers.
    with_image:  bool ``[B]``: the samples the image reaches; the others have nothing to take
                 away (gap 0), as in calplug's contrast.
    label_shift: 1 when the model's logits at row i predict label i + 1 (a causal LM); 0 when they
                 predict label i (a sequence-to-sequence decoder, whose labels the decoder input
                 is shifted from).
    prefix:      rows of the first forward's logits in front of the text (GIT's image prefix,
                 which the second forward, without the image, does not have): left out.
    """

    batch: dict
    with_image: "torch.Tensor"
    hooks: tuple = ()
    label_shift: int = 1
    prefix: int = 0


@dataclasses.dataclass
class ContrastPlan:
    """How to run one contrast pass (step 2).

    decoder_kwargs: keyword arguments of the no-grad decoder call.
    rows:           long ``[B, L]``; ``rows[b, i]`` indexes the flattened ``[B' * L']`` hidden
                    states of the contrast pass and gives the state that predicts token ``i + 1``
                    of sample ``b`` without the image; -1 means no contrast value (gap 0).
    samples:        long ``[B']``: the sample of each row of the contrast pass, in order; None
                    (the default) means every sample, ``B' = B``. Contrastive decoding
                    (`calplug.decoding`) uses it to extend the pass token by token.
    keys:           ``[B', L']`` 2-D mask (1 = a later token may attend there) of the contrast
                    pass's positions: what its padding mask would be. None (the default) means
                    ``decoder_kwargs["attention_mask"]`` when that is 2-D; a plan whose decoder
                    gets ready 4-D / per-layer-type masks sets it, or decoding refuses the plan.
    """

    decoder_kwargs: dict
    rows: "torch.Tensor"
    samples: "torch.Tensor | None" = None
    keys: "torch.Tensor | None" = None


@dataclasses.dataclass(frozen=True)
class Framework:
    """What the CAL step must know about a training framework that calls the model: framework
    knowledge the core receives, never imports (`calplug_frameworks`).

    name:              the framework (``"TRL"``, ``"axolotl"``).
    packing_off:       the framework's options that pack samples into rows, as its users write
                       them turned off (``"sample_packing: false"``); packed batches are refused
                       naming every registered framework's options.
    own_loss_trainers: trainer class names (anywhere in the MRO) whose ``compute_loss`` computes
                       its own loss and ignores the model's; `calplug.trainer.use_model_loss` makes
                       such a trainer optimise the loss the model returns.
    check_call:        optional ``fn(call: dict) -> None``, run before every CAL training step
                       with the forward's keyword arguments: raises a calplug error when the call
                       shows that this framework would discard the CAL loss (names the fix).
    check_trainer:     optional ``fn(trainer) -> None``, run by `calplug.trainer.enable_for_trainer`
                       (and the adapters) on the built trainer before it trains: raises a calplug
                       error naming an option of this framework's trainers that replaces or
                       discards the model's loss (TRL's ``loss_type``).
    """

    name: str
    packing_off: str = ""
    own_loss_trainers: tuple[str, ...] = ()
    check_call: Callable[[dict], None] | None = None
    check_trainer: Callable[[Any], None] | None = None


@dataclasses.dataclass(frozen=True)
class Contrast:
    """A contrast condition: how the "without the image" pass is built.

    name:         what ``CALConfig.contrast`` selects it by.
    build:        ``fn(main: MainPass, config: CALConfig) -> ContrastPlan | None``; None when the
                  micro-batch has nothing to contrast (every gap is 0). Pure tensor code: it must
                  not run modules, except through ``main.rerun_with_pixels`` and
                  ``main.image_free``.
    needs_pixels: True when ``build`` calls ``main.rerun_with_pixels`` (it transforms the input
                  pixels, like blur): only integrations with ``pixel_contrasts`` can then be
                  enabled, and under sharded training every rank re-runs its vision path.
    """

    name: str
    build: Callable[[MainPass, "CALConfig"], ContrastPlan | None]
    needs_pixels: bool = False


# -- model knowledge ------------------------------------------------------------------------------
@hookspec
def calplug_integrations() -> "list[Integration]":
    """Return the `Integration` records this plugin provides.

    Called when `calplug.enable` looks for the integration that can patch a model; the first
    that matches wins, third-party plugins before the built-in ones.
    """


# -- framework knowledge --------------------------------------------------------------------------
@hookspec
def calplug_frameworks() -> "list[Framework]":
    """Return the `Framework` records this plugin provides (calplug's adapters provide TRL's,
    axolotl's, LLaMA-Factory's and ms-swift's). Read when the step refuses a packed batch (to name
    every framework's packing options), before every CAL step (`Framework.check_call`), by
    `calplug.trainer.use_model_loss` and by `calplug.trainer.refuse_bypasses`
    (`Framework.check_trainer`)."""


# -- step 2: the contrast condition ---------------------------------------------------------------
@hookspec
def calplug_contrasts() -> "list[Contrast]":
    """Return the `Contrast` records this plugin provides.

    ``CALConfig.contrast`` selects one by name; names are validated against the union of all
    plugins' records, a later-registered plugin's record replacing an earlier one of the same name.
    """


# -- steps 5-7: gap -> weight -> loss -------------------------------------------------------------
@hookspec(firstresult=True)
def calplug_weights(gaps: "torch.Tensor", labels: "torch.Tensor", supervised: "torch.Tensor",
                    config: "CALConfig") -> "torch.Tensor | None":
    """Turn target-token gaps into per-row loss weights (steps 5-6); the first non-None answer wins.

    gaps:       float32 ``[B, L-1]`` gap of each shifted row (row i predicts token i+1), computed
                on token 0 where the label is ignored, 0 where there was nothing to contrast.
    labels:     long ``[B, L-1]`` shifted labels (ignore index -100 kept).
    supervised: bool ``[B, L-1]`` rows that enter the loss.
    config:     the `CALConfig`.
    Return float32 ``[B, L-1]`` weights (no gradient is taken through them). The built-in
    implementation clamps to ``[alpha, beta]`` and average-pools (`calplug.weighting`).
    """


@hookspec(firstresult=True)
def calplug_loss(logits: "torch.Tensor | None", labels: "torch.Tensor", weights: "torch.Tensor",
                 config: "CALConfig", num_items_in_batch: "int | torch.Tensor | None",
                 hidden_states: "torch.Tensor | None", lm_head: "nn.Module") -> "torch.Tensor | None":
    """Return the scalar training loss (step 7); the first non-None answer wins.

    logits:        ``[B, L, V]`` main-pass logits exactly as the model produced them (do not
                   copy them); None with ``config.loss_chunk > 0``, where no full logits exist.
    labels:        long ``[B, L]`` unshifted labels aligned with the decoder sequence.
    weights:       float32 ``[B, L-1]`` from `calplug_weights`.
    num_items_in_batch: the HF Trainer's token count over the whole accumulated batch, or None.
    hidden_states: with ``config.loss_chunk > 0``, the ``[B, L, d]`` final hidden states that
                   ``lm_head`` turns into logits; None otherwise.
    lm_head:       the output projection.
    The built-in implementation is the weighted, normalised cross-entropy of `calplug.loss`,
    chunked when ``hidden_states`` is given. An implementation that does not declare the
    ``hidden_states`` argument cannot compute a chunked loss, and ``loss_chunk > 0`` is then
    refused rather than run without it; one that declares it may return None to decline.
    """


# -- observation ----------------------------------------------------------------------------------
@hookspec
def calplug_observe_step(model: "nn.Module", gaps: "torch.Tensor", weights: "torch.Tensor",
                         labels: "torch.Tensor", supervised: "torch.Tensor",
                         contrasted: "torch.Tensor", config: "CALConfig") -> None:
    """Called after every CAL training step with that step's gaps, weights and shifted labels.

    contrasted: bool ``[B, L-1]``, the rows that got a contrast value (False where the sample had
                no image, or the row no kept state before it): their gap is 0 by definition.
    gaps:       as computed; a NaN or infinite gap stays here (the weights were computed with 0
                in its place: docs/errors.md).
    For logging, histograms and pictures. Tensors are detached; do not modify them. Return
    values are ignored.
    """


@hookspec
def calplug_observe_contrast_pass(model: "nn.Module", phase: str) -> None:
    """Called right before (``phase="start"``) and right after (``phase="end"``) every contrast
    pass: the no-grad image-blind decoder call and the target logits it gives (steps 2 and 4),
    in training and in `calplug.contrast_pass.token_gaps` alike, on every rank.

    For profilers and ``calplug bench``, which time the pass from here (synchronising the device
    themselves) instead of replacing calplug's functions. Return values are ignored; an
    implementation must not touch the model.
    """
