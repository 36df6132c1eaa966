"""What integrations share: capturing what a model hands its text decoder, and re-running its
own vision path on transformed pixels. Model mechanics (forward hooks), no CAL math.

Capturing the decoder call, rather than re-implementing a model's forward, is what lets one
integration serve a family across transformers versions: whatever the model computed (merged
embeddings, M-RoPE or skipped positions, extra visual inputs) is read as it was used.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from torch import nn

from calplug.inputs import has_pixels


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


class _CallReady(Exception):
    """Raised from a decoder pre-hook to stop a forward once the decoder's call is known."""


def decoder_inputs_with(original_forward: Callable, decoder: nn.Module, call: dict,
                        names: tuple[str, ...]) -> dict:
    """The keyword arguments ``names`` the model hands ``decoder`` for ``call`` (no grad),
    stopping before the decoder runs: the model's own path up to its text decoder (a vision tower
    and projector for cross-attention states, an encoder for encoder states), no upstream code
    copied."""

    def stop(module, args, kwargs):
        raise _CallReady({name: kwargs.get(name) for name in names})

    handle = decoder.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            original_forward(**call)
    except _CallReady as ready:
        return ready.args[0]
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never called its decoder")


def pixel_rerun(original_forward: Callable, decoder: nn.Module, call: dict,
                pixel_keys: tuple[str, ...], extras: tuple[str, ...] = ()):
    """`MainPass.rerun_with_pixels` for a model whose forward takes image tensors under
    ``pixel_keys``: ``fn(pixel_transform) -> {"inputs_embeds": ...}`` re-runs the forward up to its
    decoder call on transformed pixels; the decoder arguments ``extras`` (visual-only inputs such
    as deepstack features, which come from the same pixels) are taken from that call too. None
    when ``call`` holds no pixels (nothing to re-run). Holding the call costs nothing until a
    pixel contrast uses it: it only keeps references."""
    if not has_pixels(call, pixel_keys):
        return None
    call = {k: v for k, v in call.items() if k != "labels"}

    def rerun_with_pixels(transform: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        changed = dict(call)
        for key in pixel_keys:
            if key in changed:
                changed[key] = transform_pixels(changed[key], transform)
        if not extras:
            return {"inputs_embeds": embeddings_with(original_forward, decoder, changed)}
        return decoder_inputs_with(original_forward, decoder, changed, ("inputs_embeds",) + extras)

    return rerun_with_pixels


def transform_pixels(value, transform: Callable[[torch.Tensor], torch.Tensor]):
    """``transform`` applied to a pixel tensor, or to each tensor of a list or tuple of them;
    anything else (None, ints) is returned as it is."""
    if isinstance(value, torch.Tensor):
        return transform(value)
    if isinstance(value, (list, tuple)):
        return type(value)(transform_pixels(v, transform) for v in value)
    return value
