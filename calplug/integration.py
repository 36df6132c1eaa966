"""What an integration gives the engine: the `Integration` record and the `MainPass` it returns.

An integration holds model knowledge and no CAL math: which classes it patches, how to run the
model's own forward so that the decoder inputs, the aligned labels and the image positions can be
read, and where the decoder and ``lm_head`` live. The engine (`calplug.patching`) does the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn

# Decoder keyword arguments that describe the cache / output format, not the sequence: the
# contrast pass drops them and runs without a cache.
NON_SEQUENCE_DECODER_KWARGS = (
    "cache", "past_key_values", "use_cache", "cache_position", "output_attentions",
    "output_hidden_states", "return_dict", "input_ids",
)


@dataclasses.dataclass
class MainPass:
    """Everything the engine needs from one main (with-grad) forward.

    output:          what the model's own forward returned, computed without its own loss.
    logits:          ``[B, L, V]`` logits of that forward, as produced (never copied).
    labels:          long ``[B, L]`` labels aligned with ``logits`` (-100 = ignored).
    decoder:         the text decoder module (its output's first item is the final hidden state).
    lm_head:         the output projection (``weight [V, d]``, optional ``bias``).
    decoder_kwargs:  the keyword arguments the decoder received in the main pass.
    visual_mask:     bool ``[B, L]``, True at image (or video) positions of the decoder sequence.
    attention_mask:  ``[B, L]`` 2-D padding mask the decoder received (ones when it got none).
    position_ids:    the positions the decoder really used, explicit (``[B, L]`` or ``[k, B, L]``).
    visual_extras:   decoder keyword arguments that only carry visual information (for example
                     Qwen3-VL's deepstack features); a contrast that removes the image clears them.
    contrast_embeds: optional ``fn(pixel_transform) -> inputs_embeds`` that re-runs the vision
                     path on transformed pixels (used by pixel-level contrasts such as blur);
                     None when the micro-batch has no pixels (nothing to re-run).
    extra_loss:      a scalar the model adds to its language-model loss and that the training loss
                     must keep, with its coefficient applied (a mixture-of-experts router's
                     load-balancing loss); the engine adds it to the CAL loss. None when there is
                     none.
    """

    output: Any
    logits: torch.Tensor
    labels: torch.Tensor
    decoder: nn.Module
    lm_head: nn.Module
    decoder_kwargs: dict
    visual_mask: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    visual_extras: tuple[str, ...] = ()
    contrast_embeds: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None
    extra_loss: torch.Tensor | None = None

    @property
    def inputs_embeds(self) -> torch.Tensor:
        return self.decoder_kwargs["inputs_embeds"]


@dataclasses.dataclass
class Integration:
    """A model family calplug can patch.

    name:          short name (``"transformers-llava"``).
    model_classes: class names this integration patches; a model matches when one of them is in
                   its class's MRO (no upstream import needed), and the names are listed in the
                   error for unsupported models.
    main_pass:     ``fn(model, original_forward, kwargs) -> MainPass``; ``kwargs`` are the
                   forward's keyword arguments, ``labels`` included.
    check:         optional ``fn(model)`` run by `calplug.enable`; raises
                   `UnsupportedModelError` for versions or configurations it cannot handle.
    pixel_keys:    forward keyword arguments that carry pixels (``("pixel_values",)``). When set,
                   the engine can re-run the model's own embedding path on transformed pixels,
                   which pixel-level contrasts such as ``blur`` need.
    supports_blur: whether pixel-level contrasts work (true when ``pixel_keys`` is set, or when
                   `main_pass` fills `MainPass.contrast_embeds` itself).
    """

    name: str
    model_classes: tuple[str, ...]
    main_pass: Callable[[nn.Module, Callable, dict], MainPass]
    check: Callable[[nn.Module], None] | None = None
    pixel_keys: tuple[str, ...] = ()
    supports_blur: bool = False

    def __post_init__(self) -> None:
        self.supports_blur = self.supports_blur or bool(self.pixel_keys)

    def matches(self, model: nn.Module) -> bool:
        names = {cls.__name__ for cls in type(model).__mro__}
        return any(name in names for name in self.model_classes)


@contextlib.contextmanager
def capture_decoder_call(decoder: nn.Module) -> Iterator[dict]:
    """Record the keyword arguments of the first call of ``decoder`` inside the block.

    A forward pre-hook sees exactly what the model handed its decoder (merged embeddings,
    attention mask, positions, extra visual inputs), so no upstream code is copied and positions
    computed inside the model (M-RoPE, LLaVA-NeXT's position skipping) are reused as they were.
    The hook is removed on exit: nothing persists on the model.
    """
    captured: dict = {}
    params = inspect.signature(decoder.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def pre_hook(module, args, kwargs):
        if captured:
            return None
        captured.update(zip(names, args))
        captured.update(kwargs)
        return None

    handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def explicit_attention_mask(mask: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """The 2-D padding mask the decoder used (all ones when it received None)."""
    B, L = embeds.shape[:2]
    if mask is None:
        return torch.ones(B, L, dtype=torch.long, device=embeds.device)
    if mask.dim() != 2:
        raise NotImplementedError(
            f"calplug expects the decoder to receive a 2-D padding mask, got shape {tuple(mask.shape)}"
        )
    return mask


def arange_positions(embeds: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions 0..L-1: what Llama-type decoders use when given ``position_ids=None``."""
    B, L = embeds.shape[:2]
    return torch.arange(L, device=embeds.device).unsqueeze(0).expand(B, L)


class _EmbeddingsReady(Exception):
    """Raised from a decoder pre-hook to stop a forward once the merged embeddings exist."""


def embeddings_with(original_forward: Callable, decoder: nn.Module, call: dict) -> torch.Tensor:
    """The merged ``inputs_embeds`` the model builds for ``call`` (no grad), stopping before the
    decoder runs: the model's own vision path and splice, with no upstream code copied."""

    def stop(module, args, kwargs):
        raise _EmbeddingsReady(kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[4])

    handle = decoder.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            original_forward(**call)
    except _EmbeddingsReady as ready:
        return ready.args[0]
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never called its decoder")


def pixel_contrast_embeds(original_forward: Callable, decoder: nn.Module, call: dict,
                          pixel_keys: tuple[str, ...]):
    """``fn(pixel_transform) -> inputs_embeds`` re-running the embedding path on transformed pixels."""
    call = {k: v for k, v in call.items() if k != "labels"}

    def contrast_embeds(transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        changed = dict(call)
        for key in pixel_keys:
            if isinstance(changed.get(key), torch.Tensor):
                changed[key] = transform(changed[key])
            elif isinstance(changed.get(key), (list, tuple)):
                changed[key] = type(changed[key])(transform(x) for x in changed[key])
        return embeddings_with(original_forward, decoder, changed)

    return contrast_embeds
