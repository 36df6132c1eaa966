"""Where things live in each transformers version: every version gate of calplug is here.

Facts (docs/upstreams): from 4.52 the multimodal models hold the decoder at
``model.model.language_model`` and the head at ``model.lm_head``; before, Llava-type models had
``model.language_model.model`` / ``model.language_model.lm_head`` and Qwen-VL ``model.model`` /
``model.lm_head``. 5.0 removed the old compatibility properties.
"""
from __future__ import annotations

import functools

from torch import nn

from calplug.errors import UnsupportedModelError


@functools.lru_cache(maxsize=None)
def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def require_version(family: str, minimum: tuple[int, int], tested: str) -> None:
    """Raise `UnsupportedModelError` when the installed transformers is older than ``minimum``."""
    have = transformers_version()
    if have < minimum:
        raise UnsupportedModelError(
            f"calplug's {family} integration supports transformers >= {minimum[0]}.{minimum[1]} "
            f"(tested: {tested}); installed: {'.'.join(map(str, have))}"
        )


def text_config(config):
    return getattr(config, "text_config", None) or config


def config_token_id(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def llava_type_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Decoder and lm_head of Llava / LlavaNext / LlavaOnevision for this transformers version."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "language_model", None), nn.Module) \
            and isinstance(getattr(model, "lm_head", None), nn.Module):
        return inner.language_model, model.lm_head  # >= 4.52
    lm = getattr(model, "language_model", None)
    if lm is not None and hasattr(lm, "model") and hasattr(lm, "lm_head"):
        return lm.model, lm.lm_head  # < 4.52
    raise UnsupportedModelError(
        f"cannot find the decoder and lm_head of {type(model).__name__} in this transformers "
        f"version ({'.'.join(map(str, transformers_version()))})"
    )
