"""The encoder-decoder kind: transformers VLMs whose encoder takes the image and the text, and
whose decoder writes the target text cross-attending to the encoder's output. Florence-2 and
T5Gemma2 (image features spliced at placeholder ids of the encoder's input), BLIP-2 /
InstructBLIP / InstructBLIP-Video with a T5 language model (Q-Former query outputs at placeholder
ids, or in front of the text before releases had them), UDOP (the encoder embeds the page image
itself and adds it to the text embeddings by layout).

**The image-blind pass** is the encoder on the text alone, then the decoder as usual
(`MainPass.image_free`: the decoder's ``encoder_hidden_states`` and ``encoder_attention_mask``
recomputed without the image, no grad): where the image sits at positions of the encoder's input,
the encoder re-runs on the input it received (no vision tower) with those positions hidden from
every query (each text token at its own position: what "the text alone" means for a
bidirectional encoder with absolute, relative or rotary positions alike), and the decoder's
cross-attention skips them; where the encoder embeds pixel arguments itself (UDOP), it re-runs
without them. The decoder's targets are weighted as usual.

**Label alignment.** A sequence-to-sequence model's logits at row i predict label i (its
decoder input is the labels shifted right). calplug's engine reads rows as a causal LM's (row i
predicts label i + 1), so the main pass runs the decoder one position longer (the token after
the last label, as the model's own shift would feed it next; a causal decoder's earlier rows do
not see it) and hands the engine the labels with one ignored position in front. The caller gets
the model's own logits shape back, and ``cal_weights`` / ``cal_gaps`` ``[B, L]`` aligned with the
labels.

**Refused by nature** (`REFUSED`): models whose encoder input is only the image (Pix2Struct,
VisionEncoderDecoderModel, PP-FormulaNet) have no "same text without the image": their text is all
on the decoder side, and without the encoder's output nothing is left to condition on.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

from calplug.classes import is_named
from calplug.errors import CALInputError, UnsupportedModelError
from calplug.gap import IGNORE_INDEX
from calplug.hookspecs import Integration, MainPass, ReferencePass, hookimpl
from calplug.inputs import has_pixels
from calplug.reference import drop_arguments_hook, hide_positions_hook

from . import compat, text_decoder
from .capture import capture_decoder_call, decoder_inputs_with, transform_pixels

KIND = "the encoder-decoder kind"
ENCODER_STATES = ("encoder_hidden_states", "encoder_attention_mask")
NO_POSITIONS = ("the image enters the encoder, not the decoder sequence, so there is no "
                "share of decoder image positions for patch_mask to hide; use drop (the default), "
                "mask (the same image-free pass here) or blur")
IMAGE_ONLY = ("{name}: its encoder's input is only the image (the text is all on the decoder "
              "side), so there is no \"same text without the image\" to contrast with: without the "
              "encoder's output the decoder has nothing to condition on. CAL has no meaning here")
REFUSED = {
    "Pix2StructForConditionalGeneration": IMAGE_ONLY.format(name="Pix2Struct (a question is "
                                                             "rendered into the image)"),
    "VisionEncoderDecoderModel": IMAGE_ONLY.format(name="VisionEncoderDecoderModel"),
    "PPFormulaNetForConditionalGeneration": IMAGE_ONLY.format(name="PP-FormulaNet"),
}


# -- per-class facts ---------------------------------------------------------------------------------
def _stack(module: nn.Module) -> bool:
    return hasattr(module, "layers") or hasattr(module, "block")


def seq2seq_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack: ``get_decoder()``, looked through a sequence-to-sequence model it
    returns (Florence-2's BART) or a language model that holds one (BLIP-2's T5)."""
    found = model.get_decoder() if hasattr(model, "get_decoder") else None
    for _ in range(3):  # a model, its sequence-to-sequence model, its decoder
        if found is None or _stack(found):
            break
        inner = getattr(found, "decoder", None)
        found = inner if isinstance(inner, nn.Module) else (
            found.get_decoder() if hasattr(found, "get_decoder") else None)
    if isinstance(found, nn.Module) and _stack(found):
        return found
    language_model = getattr(model, "language_model", None)
    if language_model is not None and hasattr(language_model, "get_decoder"):
        return seq2seq_decoder(language_model)
    raise UnsupportedModelError(f"cannot find the decoder stack of {type(model).__name__}")


def seq2seq_encoder(model: nn.Module, child: str | None = None) -> nn.Module:
    """The encoder the (merged) input enters: ``get_encoder()`` (or the language model's), its
    ``child`` where the image is spliced in front of a text encoder (T5Gemma2's ``text_model``)."""
    language_model = getattr(model, "language_model", None)
    owner = language_model if language_model is not None and hasattr(language_model, "get_encoder") else model
    encoder = owner.get_encoder()
    return getattr(encoder, child) if child else encoder


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Module):
        raise UnsupportedModelError(f"cannot find the output projection of {type(model).__name__}")
    return seq2seq_decoder(model), head


def shift_with_config(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted right behind the decoder start token, -100 written as the pad token: the
    BART / T5 convention, with the ids of the text config (Florence-2's own shift)."""
    config = compat.text_config(model.config)
    start, pad = config.decoder_start_token_id, config.pad_token_id
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


def shift_own(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The model's own ``prepare_decoder_input_ids_from_labels`` (or ``_shift_right``), or its
    language model's."""
    for owner in (model, getattr(model, "language_model", None)):
        for name in ("prepare_decoder_input_ids_from_labels", "_shift_right"):
            if owner is not None and callable(getattr(owner, name, None)):
                return getattr(owner, name)(labels)
    raise UnsupportedModelError(f"{type(model).__name__} has no way to turn labels into decoder inputs")


@dataclasses.dataclass(frozen=True)
class Seq2SeqFacts:
    """One class of the kind.

    image:         "positions": the image sits at positions of the encoder's input (placeholder
                   ids, or a prefix of Q-Former queries), hidden in the image-free pass;
                   "pixels": the encoder embeds these arguments itself and re-runs without them.
    decoder_ids:   ``fn(model, labels) -> decoder_input_ids``: the model's own shift.
    encoder_child: the text encoder inside ``get_encoder()`` the merged input enters, if any.
    pixel_keys:    forward arguments holding images ``[..., H, W]`` (``blur``).
    """

    family: str
    key: str
    class_name: str
    since: tuple[int, int]
    image: object
    decoder_ids: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    encoder_child: str | None = None
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    broken_below: tuple = ()   # ((release, reason),): releases before ``release`` are broken upstream

    def encoder_positions(self, model: nn.Module, call: dict) -> torch.Tensor | None:
        """bool ``[B, Le]``: the image positions of the encoder's input ("positions" classes)."""
        if self.image != "positions":
            return None
        ids = call["input_ids"]
        names = compat.PLACEHOLDER_NAMES  # InstructBLIP-Video marks its queries with video_token_id
        if _has_placeholder(model.config, names):
            return compat.placeholder_positions(model.config, ids, names)
        queries = int(model.config.num_query_tokens)  # BLIP-2 before placeholder ids: a query prefix
        prefix = torch.zeros(ids.shape[0], queries + ids.shape[1], dtype=torch.bool, device=ids.device)
        prefix[:, :queries] = True
        return prefix


def _has_placeholder(config, names) -> bool:
    return any(isinstance(getattr(config, n, None), int) for n in names)


FLORENCE2_LOSS = (
    "transformers {version}'s Florence2ForConditionalGeneration computes its own loss as a causal "
    "LM's (ForCausalLMLoss without shift_labels), shifting labels its decoder input is already "
    "shifted from, so the model's own training objective skips a token (fixed in 5.13.0); calplug "
    "cannot check CAL against it. Use transformers >= 5.13")
_BLIP2 = dict(image="positions", decoder_ids=shift_own)
FACTS: dict[str, Seq2SeqFacts] = {f.class_name: f for f in (
    Seq2SeqFacts("Florence-2", "florence2", "Florence2ForConditionalGeneration", (4, 56), "positions",
                 shift_with_config, broken_below=(((5, 13), FLORENCE2_LOSS),)),
    Seq2SeqFacts("T5Gemma2", "t5gemma2", "T5Gemma2ForConditionalGeneration", (5, 0), "positions",
                 shift_own, encoder_child="text_model"),
    Seq2SeqFacts("UDOP", "udop", "UdopForConditionalGeneration", (4, 39),
                 ("pixel_values", "image_embeddings", "visual_bbox"), shift_own),
    Seq2SeqFacts("BLIP-2 (T5)", "blip_2_t5", "Blip2ForConditionalGeneration", (4, 45), **_BLIP2),
    Seq2SeqFacts("InstructBLIP (T5)", "instructblip_t5", "InstructBlipForConditionalGeneration", (4, 45),
                 **_BLIP2),
    Seq2SeqFacts("InstructBLIP-Video (T5)", "instructblipvideo_t5",
                 "InstructBlipVideoForConditionalGeneration", (4, 45), **_BLIP2),
)}
# Classes that are this kind only with an encoder-decoder language model (BLIP-2's T5 variants;
# with OPT they splice query outputs into a decoder-only model: the placeholder integration).
T5_VARIANTS = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration",
               "InstructBlipVideoForConditionalGeneration")


def facts_of(model: nn.Module) -> Seq2SeqFacts:
    return compat.facts_row(model, FACTS, "encoder-decoder")


def accepts(model: nn.Module) -> bool:
    """The BLIP-2 classes are this kind only with a T5 (encoder-decoder) language model."""
    if not is_named(model, T5_VARIANTS):
        return is_named(model, FACTS)
    config = getattr(model, "config", None)
    return config is not None and not getattr(config, "use_decoder_only_language_model", True)


# -- the main pass -------------------------------------------------------------------------------------
def _rows(value, samples: torch.Tensor, batch: int):
    """``value`` for ``samples`` when it is laid out per sample (a tensor of batch size)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value[samples.to(value.device)]
    return value


def _text_alone(samples: torch.Tensor, encoder: nn.Module, call: dict, hidden: torch.Tensor | None,
                pixel_kwargs: tuple[str, ...], batch: int) -> dict:
    """`MainPass.image_free`: the encoder re-run (no grad) on the text alone for ``samples``: its
    recorded input with the image positions ``hidden [B, Le]`` hidden from every query, or without
    its pixel arguments; the decoder's cross-attention then skips what the encoder holds of the
    image."""
    sub = {k: _rows(v, samples, batch) for k, v in call.items()}
    if hidden is not None:
        mask = sub.get("attention_mask")
        keys = hidden[samples.to(hidden.device)]
        mask = torch.ones(keys.shape, dtype=torch.long, device=keys.device) if mask is None else mask
        sub["attention_mask"] = mask * (~keys).to(mask.dtype)
    for name in pixel_kwargs:
        if name in sub:
            sub[name] = None
    with torch.no_grad():
        out = encoder(**sub)
    states = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    mask = getattr(out, "attention_mask", None) if not isinstance(out, (tuple, list)) else None
    return {"encoder_hidden_states": states,
            "encoder_attention_mask": sub.get("attention_mask") if mask is None else mask}


def _rerun(transform, original_forward, decoder, call: dict, pixel_keys) -> dict:
    """`MainPass.rerun_with_pixels`: the model's own encoder path on transformed pixels, up to the
    decoder call; the encoder states it hands the decoder (no grad)."""
    changed = {k: transform_pixels(v, transform) if k in pixel_keys else v for k, v in call.items()}
    return decoder_inputs_with(original_forward, decoder, changed, ENCODER_STATES)


def _longer_decoder_call(model: nn.Module, facts: Seq2SeqFacts, call: dict, labels: torch.Tensor) -> dict:
    """The forward's arguments with the decoder one position longer (module docstring): the
    model's own shift of the labels with one more (ignored) label behind them."""
    if call.get("decoder_inputs_embeds") is not None:
        raise CALInputError("decoder_inputs_embeds: calplug needs decoder_input_ids or labels to run "
                            "the decoder (pass labels, and let the model shift them)")
    longer = torch.cat([labels, labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    ids = call.get("decoder_input_ids")
    if ids is None:
        ids = facts.decoder_ids(model, longer)
    else:
        if tuple(ids.shape) != tuple(labels.shape):
            raise CALInputError(f"decoder_input_ids {tuple(ids.shape)} do not match labels "
                                f"{tuple(labels.shape)}")
        nxt = facts.decoder_ids(model, longer)[:, -1:]
        ids = torch.cat([ids, nxt.to(ids.dtype)], 1)
    out = dict(call, decoder_input_ids=ids)
    mask = call.get("decoder_attention_mask")
    if mask is not None:
        out["decoder_attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
    return text_decoder.without_cache(model, out)


def _as_given(output, logits: torch.Tensor):
    """The model's output with logits of the labels' length (a view: nothing copied)."""
    if isinstance(output, tuple):
        return tuple(logits if x is logits else x for x in output)
    output["logits"] = logits
    return output


def seq2seq_main_pass(model: nn.Module, original_forward, call: dict) -> MainPass:
    facts = facts_of(model)
    labels = call.pop("labels")
    compat.check_full_logits(call)
    if labels.dim() != 2:
        raise CALInputError(f"labels of shape {tuple(labels.shape)}: pass [batch, target_len]")
    decoder, head = decoder_and_head(model)
    encoder = seq2seq_encoder(model, facts.encoder_child)
    main_call = _longer_decoder_call(model, facts, call, labels)
    with capture_decoder_call(encoder) as encoder_call:
        recorded = text_decoder.run_recorded(original_forward, main_call, decoder, head)
    logits = text_decoder.logits_of(recorded.output)                    # [B, L + 1, V]
    after, transform = text_decoder.head_map(model, recorded, logits)
    kwargs = text_decoder.contrast_call(decoder, recorded.decoder_kwargs)
    embeds = kwargs["inputs_embeds"]
    B = embeds.shape[0]
    hidden = facts.encoder_positions(model, call)
    if hidden is not None:
        samples = hidden.any(1)
        pixel_kwargs: tuple = ()
        states = encoder_call.get("inputs_embeds")
        if states is not None and states.shape[1] != hidden.shape[1]:
            raise CALInputError(f"{type(model).__name__}: the encoder's input has {states.shape[1]} "
                                f"positions, the image positions calplug found {hidden.shape[1]}")
    else:
        pixel_kwargs = facts.image
        given = has_pixels(call, facts.pixel_keys)
        samples = torch.full((B,), given, dtype=torch.bool, device=embeds.device)
    rerun = None
    if has_pixels(call, facts.pixel_keys):
        rerun = functools.partial(_rerun, original_forward=original_forward, decoder=decoder,
                                  call=main_call, pixel_keys=facts.pixel_keys)
    padding = (main_call.get("decoder_attention_mask") if main_call.get("decoder_attention_mask") is not None
               else torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device))
    return MainPass(
        output=_as_given(recorded.output, logits[:, :-1]), logits=logits,
        labels=torch.cat([labels.new_full((B, 1), IGNORE_INDEX), labels], 1),
        decoder=text_decoder.contrast_decoder(decoder, after), lm_head=head, decoder_kwargs=kwargs,
        visual_mask=torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device),
        attention_mask=padding, position_ids=text_decoder.positions(kwargs, embeds),
        image_samples=samples.to(embeds.device),
        image_free=functools.partial(_text_alone, encoder=encoder, call=dict(encoder_call),
                                     hidden=hidden, pixel_kwargs=pixel_kwargs, batch=B),
        rerun_with_pixels=rerun, logit_transform=transform)


@dataclasses.dataclass(frozen=True)
class MainPassOf:
    """`Integration.main_pass` (a plain record, not a closure: an enabled model pickles)."""

    def __call__(self, model: nn.Module, original_forward, call: dict) -> MainPass:
        return seq2seq_main_pass(model, original_forward, call)


def check(model: nn.Module) -> None:
    facts = facts_of(model)
    compat.require_release(facts.family, facts.since, broken_below=facts.broken_below)
    decoder_and_head(model)


def refuses_contrast(model: nn.Module, contrast: str) -> str | None:
    if contrast == "patch_mask":
        return NO_POSITIONS
    return None


def reference_pass(model: nn.Module, batch: dict) -> ReferencePass:
    """The reference's image-free forward: the model's own, its encoder on the text alone (a
    pre-hook hides the image positions from the encoder and from the decoder's cross-attention,
    or hands the encoder no pixel arguments). Logits row i predicts label i."""
    facts = facts_of(model)
    encoder, decoder = seq2seq_encoder(model, facts.encoder_child), seq2seq_decoder(model)
    hidden = facts.encoder_positions(model, batch)
    if hidden is not None:
        hooks = ((encoder, hide_positions_hook(hidden, "attention_mask")),
                 (decoder, hide_positions_hook(hidden, "encoder_attention_mask")))
        return ReferencePass(batch, hidden.any(1), hooks, label_shift=0)
    ids = batch["input_ids"]
    given = has_pixels(batch, facts.pixel_keys)
    return ReferencePass(batch, torch.full((ids.shape[0],), given, dtype=torch.bool, device=ids.device),
                         ((encoder, drop_arguments_hook(facts.image)),), label_shift=0)


# -- refused by nature ---------------------------------------------------------------------------------
def refuse(model: nn.Module) -> None:
    for name, reason in REFUSED.items():
        if is_named(model, (name,)):
            raise UnsupportedModelError(f"calplug does not support {type(model).__name__}: {reason}")


def refused_main_pass(model, original_forward, call):  # never reached: `refuse` raises at enable
    refuse(model)
    raise UnsupportedModelError(f"calplug does not support {type(model).__name__}")


PROVEN = {name: (f.family, f.key, KIND) for name, f in FACTS.items()}


def refuses_decoding(model: nn.Module) -> str:
    """`Integration.decoding_refusal`: the image-blind branch of this kind is the encoder re-run
    on the text alone and a decoder cross-attending to that, with its own cross-attention cache;
    contrastive decoding only builds branches of one decoder sequence without image positions."""
    return ("the image enters its encoder, which the decoder cross-attends to at every step; an "
            "image-blind branch needs the encoder re-run on the text alone and a second "
            "cross-attention cache beside generate()'s, which calplug's contrastive decoding does "
            "not build (it leaves image positions out of one decoder sequence and its cache)")


def support_status(model_or_class) -> tuple[str, str] | None:
    """Proven for this kind's classes; BLIP-2's classes only for a model with a T5 language model
    (asked with the class, the answer is the placeholder integration's: it depends on the model)."""
    if is_named(model_or_class, T5_VARIANTS) and (isinstance(model_or_class, type) or not accepts(model_or_class)):
        return None
    return text_decoder.status_of(model_or_class, PROVEN, REFUSED)


INTEGRATIONS = [
    Integration(name="transformers-encoder-decoder", model_classes=tuple(n for n in FACTS if n not in T5_VARIANTS),
                main_pass=MainPassOf(), decoder_and_head=decoder_and_head, check=check,
                pixel_contrasts=True, accepts=accepts, contrast_refusal=refuses_contrast,
                support_status=support_status, reference_pass=reference_pass,
                decoding_refusal=refuses_decoding),
    Integration(name="refused-image-only-encoder", model_classes=tuple(REFUSED), main_pass=refused_main_pass,
                check=refuse, support_status=support_status),
]


@hookimpl
def calplug_integrations():
    return INTEGRATIONS
