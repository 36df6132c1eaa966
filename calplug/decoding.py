"""Contrastive decoding with CAL's contrast pass: `contrastive_generate`, and `contrastive_decoding`
for ``model.generate`` itself (a logits processor).

At every step, ``z`` are the main branch's next-token logits (with the image) and ``z'`` the
contrast branch's (the same tokens so far, without the image). The plausible tokens are those with
``z(v) >= log(cd_beta) + max z`` (VCD's adaptive plausibility constraint); their score is
``(1 + cd_alpha) * z(v) - cd_alpha * z'(v)``, every other token's is ``-inf``. Greedy decoding
takes the arg max, sampling samples after the temperature / top-k / top-p ``generate`` applies.
``cd_alpha = 0`` leaves the arg max of ``z``: exactly ``generate``'s greedy tokens.

How, with no model knowledge here:

* **The main branch is ``generate``'s own loop.** For the duration, the model's forward is wrapped
  on the instance. ``generate``'s first call (the prompt) runs as the integration's main pass,
  which is the model's own forward with the decoder call captured, so the prompt runs once, as
  ``generate`` would run it, and the one contrast machinery (`calplug.contrast_pass.plan`) builds
  the image-blind prefix from it: ``drop`` keeps every text token at its own position and no image
  position, ``blur`` / ``noise`` re-run the vision path on transformed pixels.
* **The contrast branch starts from its own prefill.** The plan's decoder call runs once with a
  cache of the kind the main branch got (a fresh copy of ``generate``'s empty one), rows
  right-aligned so that each ends at its last kept token (`calplug.decoding_branch`).
* **Then both branches share one decoder call per token.** Its rows are appended to the cache
  ``generate`` holds (left-padded, masked: `calplug.decoding_cache`), and at every later forward
  call of ``generate`` hooks on the text decoder and the output projection run the main rows and
  the contrast rows together: the new token's inputs are what the main branch's decoder received
  (embedding, position ids: M-RoPE or whatever the model computed, read and never recomputed);
  the model gets its own rows back and ``generate`` its own cache after the last step. Where the
  cache cannot be merged (static caches, ...), the contrast branch keeps its own cache and runs
  the decoder a second time per token on the same inputs. No prefix is recomputed.
* **The processor combines them.** `ContrastiveLogitsProcessor` takes ``z`` from ``generate``
  and ``z'`` from the contrast branch's last state through the model's own output projection
  (and its soft-capping, `MainPass.logit_transform`).

Samples without an image have nothing to contrast: for them ``z' = z``, so their score is ``z``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import numbers
from typing import Iterator

import torch
from torch import nn

from . import contrast_pass, plugins
from .decoding_branch import CACHE_ARGUMENTS, ContrastBranch, returned_cache, start_branch
from .errors import CALConfigError, CALInputError, UnsupportedModelError, warn_once
from .gap import IGNORE_INDEX
from .hookspecs import MainPass
from .inputs import has_pixels
from .scoring import resolved

# ``generate``'s "logits of the last k positions only" argument (its name across releases): held
# out of the main pass's checks and handed to the model's forward as generate passed it.
LAST_LOGITS_ARGUMENTS = ("logits_to_keep", "num_logits_to_keep")
# What generate() hands the forward instead of the pixels when it encodes images before the
# prompt (transformers 5.x): pixel contrasts need the pixels themselves back.
PRE_ENCODED_ARGUMENTS = ("mm_encoder_outputs",)
# generate() modes whose caches are reordered or cropped behind the processor's back.
REFUSED_MODES = {
    "num_beams": "beam search reorders the main branch's cache, which the contrast branch's cannot follow",
    "assistant_model": "assisted decoding crops the main branch's cache on rejected tokens",
    "prompt_lookup_num_tokens": "prompt-lookup decoding crops the main branch's cache on rejected tokens",
}


# -- the rule ---------------------------------------------------------------------------------------
def check_settings(cd_alpha, cd_beta) -> tuple[float, float]:
    """``(cd_alpha, cd_beta)`` as floats: ``cd_alpha >= 0`` (how far the contrast pushes),
    ``0 <= cd_beta <= 1`` (the plausibility cut; 0 turns it off)."""
    for name, value, low, high, example in (("cd_alpha", cd_alpha, 0.0, math.inf, "cd_alpha=1.0"),
                                            ("cd_beta", cd_beta, 0.0, 1.0, "cd_beta=0.1")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not low <= float(value) <= high:
            rng = f"in [{low:g}, {high:g}]" if high != math.inf else f">= {low:g}"
            raise CALConfigError(f"{name} must be a finite number {rng}, got {value!r}: e.g. {example} "
                                 "(VCD's defaults: cd_alpha=1.0, cd_beta=0.1)")
    return float(cd_alpha), float(cd_beta)


def contrastive_scores(z: torch.Tensor, z_contrast: torch.Tensor, contrasted: torch.Tensor,
                       cd_alpha: float, cd_beta: float) -> torch.Tensor:
    """float32 ``[B, V]`` scores: ``(1 + a) z - a z'`` on rows ``contrasted [B]`` (``z`` on the
    others), ``-inf`` where ``z < log(cd_beta) + max z``."""
    z = z.float()
    scores = torch.where(contrasted.unsqueeze(1), (1.0 + cd_alpha) * z - cd_alpha * z_contrast.float(), z)
    if cd_beta > 0.0:
        cutoff = math.log(cd_beta) + z.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(z < cutoff, -math.inf)
    return scores


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value)


def positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@contextlib.contextmanager
def _recording(decoder: nn.Module, names: list[str]) -> Iterator[dict]:
    """The keyword arguments of ``decoder``'s first call inside the block (positional ones named
    by ``names``)."""
    seen: dict = {}

    def record(module, args, kwargs):
        if not seen:
            seen.update(zip(names, args))
            seen.update(kwargs)

    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


# -- one decoding session: the forward wrapper and the processor -------------------------------------
class DecodingSession:
    """What `contrastive_decoding` installs: the instance forward that runs the main branch as
    ``generate`` calls it, the contrast branch beside it, and the settings."""

    def __init__(self, model: nn.Module, cd_alpha: float, cd_beta: float, contrast: str, config,
                 max_new_tokens: int | None, inputs: dict | None, join: bool = True):
        self.cd_alpha, self.cd_beta = check_settings(cd_alpha, cd_beta)
        self.join = bool(join)
        (self.target, self.config, self.integration, self.contrast,
         self.original) = resolved(model, config, contrast=contrast)
        refusal = self.integration.decoding_refusal
        reason = refusal(self.target) if refusal is not None else None
        if reason:
            raise UnsupportedModelError(not_decoded(self.target, reason))
        self.signature = inspect.signature(self.original)
        self.max_new_tokens = max_new_tokens
        self.inputs = dict(inputs or {})
        self.expect_image = has_pixels(self.inputs)
        self.branch: ContrastBranch | None = None
        self.span: int | None = None
        self.seen = 0
        self.processed = 0   # calls of the logits processor
        self.active = False  # inside its contrastive_decoding block

    # the instance forward ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        call = self.signature.bind_partial(*args, **kwargs).arguments
        var = next((n for n, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
        call.update(call.pop(var, {}) if var else {})
        cache = next((call[k] for k in CACHE_ARGUMENTS if call.get(k) is not None), None)
        if _cache_length(cache) == 0:
            return self.prefill(call)
        return self.step(call)

    def prefill(self, call: dict):
        held = {k: call.pop(k) for k in LAST_LOGITS_ARGUMENTS if k in call}
        self.leave()
        cache_key = next((k for k in CACHE_ARGUMENTS if k in call), None)
        fresh = copy.deepcopy(call[cache_key]) if cache_key and call[cache_key] is not None else None
        forward = functools.partial(self.original, **held) if held else self.original
        sequence = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        if sequence is None and call.get("decoder_input_ids") is not None:
            raise UnsupportedModelError(not_decoded(
                self.target, "generate() ran its encoder first and calls the forward with encoder "
                "outputs and decoder tokens (an encoder-decoder model), while the only image-blind "
                "branch calplug's contrastive decoding builds leaves image positions out of one "
                "decoder sequence"))
        if sequence is None:
            raise CALInputError("generate called the model with neither input_ids nor inputs_embeds")
        if self.contrast.needs_pixels and not has_pixels(call):
            call = self._with_pixels(call)
        if self.expect_image and call.get("input_ids") is None and not has_pixels(call):
            raise UnsupportedModelError(
                f"{type(self.target).__name__}.generate() called the model's forward with merged "
                "inputs_embeds and no pixels: the model splices the image into the embeddings "
                "inside its own generate() (as the LLaVA codebases do), so the forward never "
                "shows where the image is and calplug's contrastive decoding cannot take it away")
        labels = torch.full(sequence.shape[:2], IGNORE_INDEX, dtype=torch.long, device=sequence.device)
        main = self.integration.main_pass(self.target, forward, dict(call, labels=labels))
        if main.image_free is not None:  # an integration that did not declare its refusal
            raise UnsupportedModelError(not_decoded(
                self.target, "its integration takes the image out by other means than leaving image "
                "positions out of the decoder's sequence (MainPass.image_free), which is the only "
                "image-blind branch calplug's contrastive decoding builds"))
        self.seen, self.branch = int(sequence.shape[1]), None
        if not bool(main.with_image.any()):
            if self.expect_image:
                raise UnsupportedModelError(
                    f"the inputs hold pixels, but {type(self.target).__name__}'s integration found "
                    "no image position in the prompt generate() ran (placeholder tokens missing?): "
                    "there is nothing for contrastive decoding to take away")
            return main.output
        contrast = self._contrast_for(main)
        plan = contrast_pass.plan(self.target, main, self.config.replace(contrast=contrast.name), contrast)
        if plan is not None:
            cache_key = cache_key or next((k for k in CACHE_ARGUMENTS if k in main.decoder_kwargs),
                                          "past_key_values")
            self.branch = start_branch(main, plan, cache_key, fresh)
            self.decoder_names = positional_names(main.decoder)
            if self.join:
                self.branch.join(_main_cache(main, cache_key), int(sequence.shape[0]), self.seen)
            else:
                self.branch.unjoined = "joining was turned off (join=False)"
        self.span = main.attention_span
        return main.output

    def _with_pixels(self, call: dict) -> dict:
        """``call`` with the generate() call's image inputs in place of the image features
        generate() encoded before the prompt: the forward encodes them again (the same features),
        and the integration can re-run the vision path on transformed pixels."""
        if not has_pixels(self.inputs):
            raise CALInputError(
                f"contrast={self.contrast.name!r} re-runs the vision path on transformed pixels, but "
                "generate() handed the forward no pixels (transformers 5.x encodes images before "
                "the prompt): pass the generate() inputs, contrastive_decoding(model, inputs=inputs)"
                ", or use calplug.contrastive_generate")
        accepted = self.signature.parameters
        added = {k: v for k, v in self.inputs.items() if k not in call and k in accepted}
        return {**{k: v for k, v in call.items() if k not in PRE_ENCODED_ARGUMENTS}, **added}

    def _contrast_for(self, main: MainPass):
        """``drop`` for as long as the decoder's sliding window / attention chunk cannot tell: a
        sequence that will outgrow it decodes with ``mask`` (warned), as the training step does."""
        L = main.visual_mask.shape[1]
        span = main.attention_span
        new = 1 if self.max_new_tokens is None else self.max_new_tokens  # at least one
        if self.contrast.name != "drop" or span is None or L + new <= span:
            return self.contrast
        refusal = self.integration.contrast_refusal
        reason = refusal(self.target, "mask") if refusal is not None else None
        if reason:
            raise UnsupportedModelError(
                f"contrast='drop' cannot decode past the decoder's attention span ({span}) exactly "
                f"({L} + {new} new tokens), and contrast='mask' is refused: {reason}")
        warn_once(f"decode-span:{type(self.target).__name__}",
                  f"contrastive decoding: the prompt ({L} positions) plus {new} new token(s) "
                  "outgrows the decoder's sliding window / attention chunk "
                  f"({span}), which its layers count in cache positions; the contrast branch keeps the "
                  "image positions and masks them (contrast='mask') so that it stays exact",
                  UserWarning, stacklevel=4)
        return plugins.resolve_contrast("mask")

    def step(self, call: dict):
        branch = self.branch
        new = _step_length(call)
        if branch is not None and branch.shortened and self.span is not None and self.seen + new > self.span:
            raise CALInputError(
                f"the sequence grew past the decoder's sliding window / attention chunk "
                f"({self.span}) while the contrast branch drops the image, so its windows would "
                "differ: pass max_new_tokens to contrastive_decoding (it then masks instead), "
                "or use contrast='mask'")
        try:
            if branch is None:
                out = self.original(**call)
            elif branch.joined:
                with branch.joined_step(self.decoder_names, call.get("attention_mask")):
                    out = self.original(**call)
            else:
                with _recording(branch.decoder, self.decoder_names) as step:
                    out = self.original(**call)
                branch.extend(step, call.get("attention_mask"))
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{self.refusal()}{error}") from error
        self.seen += new
        return out

    def refusal(self) -> str:
        """The start of an `UnsupportedModelError` for a model found out at run time."""
        return (f"calplug's contrastive decoding does not support {type(self.target).__name__} "
                f"({contrast_pass.package_version(self.target)}): ")

    def leave(self) -> None:
        """Give ``generate()``'s cache its own rows back (the end of a ``generate`` call)."""
        if self.branch is not None:
            self.branch.leave()

    @property
    def joined(self) -> bool | None:
        """Whether the last ``generate`` call ran both branches in one decoder call per step (None
        when it had no contrast branch); `unjoined` says why not."""
        return None if self.branch is None else self.branch.unjoined is None

    @property
    def unjoined(self) -> str | None:
        return None if self.branch is None else self.branch.unjoined

    # the processor ----------------------------------------------------------------------------
    def scores(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.processed += 1
        if self.seen == 0 and self.active:
            raise UnsupportedModelError(
                f"{self.refusal()}its generate() never called its own forward (it hands the prompt "
                "or the image embeddings to an inner model's generate(), as BLIP-2's and Kosmos-2's "
                "do), so calplug never sees where the image is. Plain generate() works")
        if self.seen == 0:
            name = type(self.target).__name__
            raise CALInputError(
                f"the contrastive logits processor ran before {name}.forward was ever called: use "
                "the processor with the model it was made for, inside its `with "
                "calplug.contrastive_decoding(model) as processor:` block. If you did, "
                f"{name}.generate() hands the prompt to an inner model's generate() without "
                "calling the forward that contrastive decoding wraps, and calplug cannot decode it")
        if input_ids.shape[1] != self.seen:
            raise CALInputError(
                f"the contrastive logits processor got {input_ids.shape[1]} tokens, but its model "
                f"has run {self.seen}: use the processor with the model it was made for, inside "
                "its `with calplug.contrastive_decoding(model) as processor:` block")
        if self.branch is None:
            none = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
            return contrastive_scores(scores, scores, none, self.cd_alpha, self.cd_beta).to(scores.dtype)
        z_contrast, has = self.branch.logits(scores)
        return contrastive_scores(scores, z_contrast, has, self.cd_alpha, self.cd_beta).to(scores.dtype)


def not_decoded(model: nn.Module, reason: str) -> str:
    """The refusal of a model contrastive decoding cannot run: the class, why, what works."""
    return (f"calplug's contrastive decoding does not support {type(model).__name__}: {reason}. "
            f"Plain {type(model).__name__}.generate() works, and so do CAL training "
            "(calplug.enable) and calplug.token_gaps on it; contrastive decoding runs on the "
            "families whose image sits at positions of the text decoder's sequence (docs/decoding.md)")


def _main_cache(main: MainPass, cache_key: str):
    """The cache object ``generate()`` holds after the prefill: the one the model returned."""
    try:
        return returned_cache(main.output)
    except CALInputError:
        return main.decoder_kwargs.get(cache_key)


def _step_length(call: dict) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = call.get(name)
        if isinstance(value, torch.Tensor):
            return int(value.shape[1])
    return 1


class ContrastiveLogitsProcessor:
    """A ``generate`` logits processor: ``generate``'s scores in, contrastive scores out (the rule
    of this module). Made by `contrastive_decoding`, valid inside its block."""

    def __init__(self, session: DecodingSession):
        self.session = session

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.session.scores(input_ids, scores)

    @property
    def joined(self) -> bool | None:
        """Whether the last ``generate`` call ran both branches in one decoder call per step (None:
        it had nothing to contrast); `unjoined` says why not (docs/decoding.md)."""
        return self.session.joined

    @property
    def unjoined(self) -> str | None:
        return self.session.unjoined


class _DecodingForward:
    """The instance attribute ``forward`` during `contrastive_decoding`, with the forward's own
    signature (``generate`` inspects it)."""

    def __init__(self, session: DecodingSession):
        self.session = session
        self.__signature__ = session.signature

    def __call__(self, *args, **kwargs):
        return self.session.forward(*args, **kwargs)


# -- public API -------------------------------------------------------------------------------------
@contextlib.contextmanager
def contrastive_decoding(model: nn.Module, *, cd_alpha: float = 1.0, cd_beta: float = 0.1,
                         contrast: str = "drop", config=None, max_new_tokens: int | None = None,
                         inputs: dict | None = None, join: bool = True) -> Iterator[ContrastiveLogitsProcessor]:
    """``with contrastive_decoding(model) as processor: model.generate(..., logits_processor=
    [processor])``: contrastive decoding inside ``generate`` (greedy or sampling; not beam search
    or assisted decoding). The model's forward is wrapped on the instance inside the block and
    restored after. ``config``: the contrast's settings (`CALConfig`: ``blur_sigma``,
    ``noise_step``, ``seed``). ``max_new_tokens``: lets ``drop`` switch to ``mask`` up front for
    decoders with a sliding window the sequence will outgrow. ``inputs``: the generate() call's
    inputs, which the pixel contrasts need where generate() encodes images before the prompt
    (transformers 5.x), and which make a prompt with pixels but no image position an error.
    ``join``: run both branches in one decoder call per step where the cache allows it (the
    processor's ``joined`` / ``unjoined`` tell); False keeps two decoder calls per step."""
    session = DecodingSession(model, cd_alpha, cd_beta, contrast, config, max_new_tokens, inputs, join)
    target = session.target
    previous = target.__dict__.get("forward")
    target.forward = _DecodingForward(session)
    session.active = True
    try:
        yield ContrastiveLogitsProcessor(session)
    finally:
        session.active = False
        session.leave()
        if previous is None:
            target.__dict__.pop("forward", None)
        else:
            target.__dict__["forward"] = previous


def contrastive_generate(model: nn.Module, *, cd_alpha: float = 1.0, cd_beta: float = 0.1,
                         contrast: str = "drop", max_new_tokens: int | None = None,
                         do_sample: bool = False, config=None, join: bool = True, **inputs):
    """``model.generate(**inputs, max_new_tokens=..., do_sample=...)`` with contrastive decoding
    against CAL's image-blind pass; returns what ``generate`` returns (the prompt and the new
    tokens; padded batches, each row stopping at its end-of-sequence token). ``inputs``: the
    processor's outputs (left-padded for a batch) and any other ``generate`` arguments
    (temperature, top_k, top_p, ...). ``cd_alpha=0`` gives ``generate``'s greedy tokens.
    ``join=False`` runs the contrast branch in a decoder call of its own at every step (the
    default joins it to the main branch's call where the cache allows: docs/decoding.md)."""
    generation = inputs.get("generation_config") or getattr(model, "generation_config", None)
    for name, why in REFUSED_MODES.items():
        value = inputs.get(name, getattr(generation, name, None) if name == "num_beams" else None)
        if value is not None and not (name == "num_beams" and value == 1):
            raise CALInputError(f"contrastive decoding does not support {name}={value!r}: {why}")
    user = list(inputs.pop("logits_processor", None) or [])
    if max_new_tokens is not None:
        inputs["max_new_tokens"] = max_new_tokens
    with contrastive_decoding(model, cd_alpha=cd_alpha, cd_beta=cd_beta, contrast=contrast,
                              config=config, max_new_tokens=max_new_tokens,
                              inputs=inputs, join=join) as processor:
        out = model.generate(**inputs, do_sample=do_sample, logits_processor=[processor] + user)
    session = processor.session
    if session.seen and not session.processed:
        raise UnsupportedModelError(
            f"{session.refusal()}its generate() never called the logits processor it was given "
            "(Janus' generate drops logits_processor in text mode), so the tokens it returned are "
            "plain greedy / sampled ones")
    return out
