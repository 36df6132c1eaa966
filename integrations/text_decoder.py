"""What the integrations of the kinds whose image is not (only) spliced at placeholder ids share:
the cross-attention kind (`integrations/cross_attention.py`), the encoder-decoder kind
(`integrations/encoder_decoder.py`) and Kosmos' splice inside its text model
(`integrations/kosmos.py`). Model mechanics, no CAL math.

* **A recorded main pass** (`run_recorded`): the model's own forward, while hooks record the
  text decoder's call, what the decoder returned, and what the output projection received and
  returned. The contrast pass needs the decoder's call; the other two let the integration check
  that the model's logits are the projection of the decoder's output, and take over what lies in
  between (`head_map`): T5's tied-embedding rescale (a scalar on the hidden states) and a final
  logit soft-capping. Anything else is refused by name, never silently ignored.
* **The contrast pass's decoder call** (`contrast_call`): these decoders receive token ids, and
  the contrast machinery works on embeddings, so the ids are embedded with the decoder's own
  input table (no grad; its own scale included where the table applies it).
* **`ContrastDecoder`**: the decoder as the contrast pass calls it: position ids left out for a
  decoder that takes none (they are then its own 0..L-1), the rescale applied to its output.
* **Support status** of the classes these integrations name (`status_of`), for ``calplug
  verify`` and the support matrix, which asks by class.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

import torch
from torch import nn

from calplug import gap
from calplug.errors import CALInputError, UnsupportedModelError

from . import compat
from .capture import capture_decoder_call

CALL_SIZE_CHECKED = 4  # rows of the first sample compared when checking the decoder-to-logits map


@dataclasses.dataclass
class Recorded:
    """One main pass: the forward's output, the decoder's call (keyword arguments), its first
    output, the output projection's input and output, and the ``position_ids`` the decoder's
    first layer received (a decoder that numbers positions from its padding mask, as Idefics
    does, computes them inside)."""

    output: object
    decoder_kwargs: dict
    decoder_out: torch.Tensor | None
    head_in: torch.Tensor | None
    head_out: torch.Tensor | None
    layer_positions: torch.Tensor | None = None
    image_states: torch.Tensor | None = None  # set by an integration that records them (Idefics)


def run_recorded(original_forward: Callable, call: dict, decoder: nn.Module, head: nn.Module) -> Recorded:
    """Run ``original_forward(**call)`` recording the first call of ``decoder`` and of ``head``
    (hooks removed on exit: nothing persists on the model)."""
    seen: dict = {}

    def decoder_out(module, args, output):
        if "decoder_out" not in seen:
            seen["decoder_out"] = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state

    def head_io(module, args, output):
        if "head_in" not in seen:
            seen["head_in"], seen["head_out"] = args[0], output

    def layer_positions(module, args, kwargs):
        if "positions" not in seen:
            seen["positions"] = kwargs.get("position_ids")

    handles = [decoder.register_forward_hook(decoder_out), head.register_forward_hook(head_io)]
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        handles.append(layers[0].register_forward_pre_hook(layer_positions, with_kwargs=True))
    try:
        with capture_decoder_call(decoder) as decoder_kwargs:
            output = original_forward(**call)
    finally:
        for handle in handles:
            handle.remove()
    if not decoder_kwargs:
        raise UnsupportedModelError(f"the model's forward never called its text decoder "
                                    f"({type(decoder).__name__})")
    return Recorded(output, decoder_kwargs, seen.get("decoder_out"), seen.get("head_in"), seen.get("head_out"),
                    seen.get("positions"))


def logits_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.logits


def without_cache(model: nn.Module, call: dict) -> dict:
    """``call`` with ``use_cache=False`` where the forward takes it and the caller did not say:
    a training forward with labels turns the cache off itself, and the main pass runs without
    labels."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params and call.get("use_cache") is None:
        return dict(call, use_cache=False)
    return call


# -- the contrast pass's call -----------------------------------------------------------------
def contrast_call(decoder: nn.Module, kwargs: dict) -> dict:
    """The decoder's recorded call with its token ids embedded by its own input table (no grad):
    the contrast machinery gathers and masks embeddings. A call that already carried embeddings
    is returned as it was."""
    if kwargs.get("inputs_embeds") is not None:
        return dict(kwargs)
    ids = kwargs.get("input_ids")
    if ids is None:
        raise UnsupportedModelError(f"{type(decoder).__name__} was called with neither input_ids "
                                    "nor inputs_embeds")
    with torch.no_grad():
        embeds = input_table(decoder)(ids)
    return {**{k: v for k, v in kwargs.items() if k != "input_ids"}, "inputs_embeds": embeds}


def input_table(decoder: nn.Module) -> nn.Module:
    """The decoder's own token embedding (``get_input_embeddings()``, or its ``embed_tokens`` where
    a release's module has no accessor)."""
    table = getattr(decoder, "embed_tokens", None)
    if isinstance(table, nn.Module):
        return table
    return decoder.get_input_embeddings()


def padding_mask(kwargs: dict, embeds: torch.Tensor) -> torch.Tensor:
    """The decoder's 2-D padding mask (ones when it received none)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(embeds.shape[:2]):
        return mask
    if mask is not None:
        raise CALInputError(f"the text decoder received an attention mask of shape "
                            f"{tuple(getattr(mask, 'shape', ()))}; calplug needs a [batch, seq_len] "
                            "padding mask there")
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


def positions(kwargs: dict, embeds: torch.Tensor, layer: torch.Tensor | None = None) -> torch.Tensor:
    """The positions the decoder used: the ones it was handed, else the ones its first layer
    received (``layer``), else 0..L-1 (the default of every decoder these integrations name,
    cache empty)."""
    given = kwargs.get("position_ids")
    if given is None:
        given = layer
    if isinstance(given, torch.Tensor):
        return given.expand(embeds.shape[0], -1) if given.dim() == 2 else given
    B, L = embeds.shape[:2]
    return torch.arange(L, device=embeds.device).unsqueeze(0).expand(B, L)


class ContrastDecoder(nn.Module):
    """The text decoder as the contrast pass calls it. ``position_ids`` are passed only to a
    decoder that takes them (others number positions 0..L-1 themselves, which the contrast
    passes of these kinds keep: they remove no position); ``after`` maps the decoder's last hidden
    state to what the output projection receives (a rescale, BLIP's prediction transform)."""

    def __init__(self, decoder: nn.Module, after: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.decoder = decoder
        self.after = after
        self.takes_positions = "position_ids" in inspect.signature(decoder.forward).parameters

    def forward(self, **kwargs):
        given = kwargs.pop("position_ids", None)
        if self.takes_positions:
            kwargs["position_ids"] = given
        elif given is not None:
            embeds = kwargs["inputs_embeds"]
            expected = torch.arange(embeds.shape[1], device=given.device)
            if not bool((given == expected).all()):
                raise CALInputError(
                    f"{type(self.decoder).__name__} numbers its positions 0..L-1 itself, and this "
                    "contrast pass would move its tokens; pass right-padded labels (no holes in a "
                    "decoder_attention_mask)")
        out = self.decoder(**kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return (hidden if self.after is None else self.after(hidden),)


def contrast_decoder(decoder: nn.Module, after=None) -> nn.Module:
    """`ContrastDecoder` around ``decoder`` (so a decoder that takes no positions and the map
    between decoder and head are handled alike)."""
    return ContrastDecoder(decoder, after)


class JoinedHead(nn.Module):
    """A decoupled output projection (Idefics: ``weight`` for the vocabulary, ``additional_fc``
    for tokens added after pretraining, their logits concatenated) as the contrast side reads
    one: ``weight`` (and ``bias``) with the added rows behind the vocabulary's, made when read
    (no grad)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.head.weight, self.head.additional_fc.weight], 0)

    @property
    def bias(self) -> torch.Tensor | None:
        if self.head.bias is None:
            return None
        with torch.no_grad():
            return torch.cat([self.head.bias, self.head.additional_fc.bias], 0)


def contrast_head(head: nn.Module) -> nn.Module:
    """The output projection as the contrast side reads it: a decoupled one joined."""
    if isinstance(getattr(head, "additional_fc", None), nn.Linear):
        return JoinedHead(head)
    return head


# -- what lies between the decoder's output and the logits ------------------------------------------
def _scale(value: torch.Tensor, factor: float) -> torch.Tensor:
    return value * factor


def head_map(model: nn.Module, recorded: Recorded, logits: torch.Tensor, between=None):
    """``(after, transform)``: the map from the decoder's last hidden state to the output
    projection's input (None: the same tensor; a scalar rescale, as T5 applies with tied
    embeddings; ``between``, a module the integration names, such as BLIP's prediction
    transform), and the map from the projection's output to the model's logits (None: the same;
    the final soft-capping its config names). Checked on a few rows of the first sample; any
    other map is refused naming the class, so that the contrast side's target logits are the same
    kind of number as the model's."""
    name = type(model).__name__
    dec, head_in, head_out = recorded.decoder_out, recorded.head_in, recorded.head_out
    if dec is None or head_in is None or head_out is None:
        raise UnsupportedModelError(f"{name}: its forward did not call the text decoder and the "
                                    "output projection calplug found")
    after = between
    if between is not None:
        with torch.no_grad():
            mapped = between(dec[0, :CALL_SIZE_CHECKED].detach())
        if not torch.allclose(mapped.float(), head_in[0, :CALL_SIZE_CHECKED].detach().float(), rtol=1e-4, atol=1e-5):
            raise UnsupportedModelError(
                f"{name}: its output projection does not receive {type(between).__name__} of the "
                "text decoder's output; calplug cannot compute the contrast side's target logits")
    elif head_in is not dec:
        a, b = dec[0, :CALL_SIZE_CHECKED].detach().float(), head_in[0, :CALL_SIZE_CHECKED].detach().float()
        factor = float((a * b).sum() / (a * a).sum().clamp(min=1e-30))
        if a.shape != b.shape or not torch.allclose(a * factor, b, rtol=1e-4, atol=1e-5):
            raise UnsupportedModelError(
                f"{name}: between its text decoder and its output projection the hidden states "
                "change in a way calplug does not reproduce (not a scalar rescale); it cannot "
                "compute the contrast side's target logits for this model")
        after = None if factor == 1.0 else functools.partial(_scale, factor=factor)
    transform = None
    if logits is not head_out:
        cap = _softcap_of(model.config)
        a = head_out[0, :CALL_SIZE_CHECKED].detach().float()
        b = logits[0, :CALL_SIZE_CHECKED].detach().float()
        if cap is None or a.shape != b.shape or not torch.allclose(gap.softcap(a, cap), b, rtol=1e-4, atol=1e-4):
            raise UnsupportedModelError(
                f"{name} transforms the output projection's logits in a way calplug does not know "
                f"(transformers {'.'.join(map(str, compat.transformers_version()))}); the contrast "
                "side's target logits would not match the model's")
        transform = functools.partial(gap.softcap, cap=cap)
    return after, transform


def _softcap_of(config) -> float | None:
    for sub in (config, getattr(config, "decoder", None), compat.text_config(config)):
        cap = getattr(sub, "final_logit_softcapping", None)
        if isinstance(cap, (int, float)) and cap:
            return float(cap)
    return None


# -- support status -----------------------------------------------------------------------------------
def status_of(model_or_class, proven: dict[str, tuple[str, str, str]], refused: dict[str, str]):
    """`Integration.support_status` of these integrations, asked with a model or its class: the
    first transformers class of its MRO that ``proven`` ({class: (family, key, kind)}) or
    ``refused`` ({class: reason}) names."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for base in cls.__mro__:
        if base.__name__ in refused:
            return "refused", refused[base.__name__]
        if base.__name__ in proven:
            family, key, kind = proven[base.__name__]
            return "proven", (f"{family}: {kind}; family cases hf-{key}-* in calplug's tests "
                              "(tests/cases.py) run every property that applies to it")
    return None

