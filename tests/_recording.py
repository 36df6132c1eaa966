"""Test helpers that watch a step from outside: the calls a module gets, the shapes ops produce."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@contextlib.contextmanager
def record_calls(module):
    """Record the shape of ``inputs_embeds`` (or the first argument, or the first tensor argument)
    of every call of ``module``."""
    shapes = []

    def pre_hook(mod, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None:  # token ids, pixels: the first tensor the call holds
            x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        shapes.append(tuple(x.shape))

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


class ShapeRecorder(TorchDispatchMode):
    """Records ``(op, shape)`` of every tensor an op produces inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out
