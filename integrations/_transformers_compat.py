"""Where things live in each transformers version: every version gate of calplug is here.

Facts (docs/upstreams): from 4.52 the multimodal models hold the decoder at
``model.model.language_model`` and the head at ``model.lm_head``; before, Llava-type models had
``model.language_model.model`` / ``model.language_model.lm_head`` and Qwen-VL ``model.model`` /
``model.lm_head``. 5.0 removed the old compatibility properties.

Other gates kept here: the image-token config name (``image_token_index`` before 4.52,
``image_token_id`` after), Qwen-VL positions when the decoder was handed ``None`` (4.45-4.46
training forwards), the name of the "only the last k logits" argument (``num_logits_to_keep``
in 4.45, ``logits_to_keep`` later), Qwen's ``mm_token_type_ids`` (5.3+), and the supported
version range of every family. The engine pops ``num_items_in_batch`` from the call before the
original forward runs, so versions whose forward rejects it (Llava 4.45, Qwen2-VL up to 4.52)
never receive it.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from calplug.errors import CALInputError, UnsupportedModelError
from calplug.integration import Integration


@functools.lru_cache(maxsize=None)
def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def require_version(family: str, minimum: tuple[int, int], tested: str,
                    below: tuple[int, int] = (6, 0)) -> None:
    """Raise `UnsupportedModelError` unless ``minimum <= installed transformers < below``."""
    have = transformers_version()
    if not minimum <= have < below:
        raise UnsupportedModelError(
            f"calplug's {family} integration supports transformers >= {minimum[0]}.{minimum[1]}, "
            f"< {below[0]}.{below[1]} (tested: {tested}); installed: {'.'.join(map(str, have))}. "
            f"Install a supported version, e.g. pip install 'transformers>={minimum[0]}.{minimum[1]},"
            f"<{below[0]}'"
        )


# The releases the tox matrix runs (tox.ini [testenv:hf-*] and the default env); the oldest one
# per family is the first release that has the family (Qwen3-VL: 4.57.0 was yanked).
TESTED_VERSIONS = ("4.45.2", "4.49.0", "4.57.6", "5.24.0")

# family -> (transformers class name, oldest supported (major, minor))
SUPPORTED = {
    "Llava": ("LlavaForConditionalGeneration", (4, 45)),
    "LlavaNext": ("LlavaNextForConditionalGeneration", (4, 45)),
    "LlavaNextVideo": ("LlavaNextVideoForConditionalGeneration", (4, 45)),
    "LlavaOnevision": ("LlavaOnevisionForConditionalGeneration", (4, 45)),
    "Qwen2-VL": ("Qwen2VLForConditionalGeneration", (4, 45)),
    "Qwen2.5-VL": ("Qwen2_5_VLForConditionalGeneration", (4, 49)),
    "Qwen3-VL": ("Qwen3VLForConditionalGeneration", (4, 57)),
    "Qwen3-VL-MoE": ("Qwen3VLMoeForConditionalGeneration", (4, 57)),
}


def family_integration(family: str, name: str, main_pass, **extra) -> Integration:
    """The `Integration` of a transformers family of `SUPPORTED`: its class name and version gate
    come from that table, so each is written once. ``extra``: further `Integration` fields."""
    return Integration(name=name, model_classes=(SUPPORTED[family][0],), main_pass=main_pass,
                       check=version_check(family), **extra)


def version_check(family: str):
    """An `Integration.check` for ``family``: the installed transformers must be supported."""
    minimum = SUPPORTED[family][1]
    tested = ", ".join(v for v in TESTED_VERSIONS if tuple(map(int, v.split(".")[:2])) >= minimum)

    def check(model: nn.Module) -> None:
        require_version(family, minimum, tested)

    return check


# Names of the "compute logits for the last k positions only" argument across versions.
LOGITS_TO_KEEP_NAMES = ("logits_to_keep", "num_logits_to_keep")


def check_full_logits(call: dict) -> None:
    """CAL weights every position: a training call that asks for only the last k logits is refused."""
    for name in LOGITS_TO_KEEP_NAMES:
        value = call.get(name)
        if value is not None and not (isinstance(value, int) and value == 0):
            raise CALInputError(
                f"{name}={value!r}: calplug needs the logits of every position to weight the loss; "
                f"leave {name} at its default (0) in training"
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
    """Decoder and lm_head of Llava / LlavaNext(Video) / LlavaOnevision for this transformers version."""
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


def qwen_type_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Decoder and lm_head of Qwen2-VL / Qwen2.5-VL / Qwen3-VL (MoE) for this transformers version."""
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if isinstance(inner, nn.Module) and isinstance(head, nn.Module):
        language_model = getattr(inner, "language_model", None)
        if isinstance(language_model, nn.Module):
            return language_model, head  # >= 4.52
        if hasattr(inner, "layers"):
            return inner, head  # < 4.52: model.model is the text decoder
    raise UnsupportedModelError(
        f"cannot find the decoder and lm_head of {type(model).__name__} in this transformers "
        f"version ({'.'.join(map(str, transformers_version()))})"
    )


def qwen_positions(position_ids: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """The M-RoPE positions the Qwen decoder used, explicit.

    4.45-4.46 training forwards hand the decoder ``position_ids=None``; it then uses 0..L-1 on all
    three axes. Later versions hand ``[3, B, L]`` (or ``[4, B, L]`` with text positions first,
    or ``[B, L]``), which are returned as they are.
    """
    if position_ids is not None:
        return position_ids
    B, L = embeds.shape[:2]
    return torch.arange(L, device=embeds.device).view(1, 1, L).expand(3, B, L)


def warn_if_mrope_disabled(model: nn.Module, call: dict) -> None:
    """From 5.3 Qwen-VL forwards take ``mm_token_type_ids`` and need it for M-RoPE when images or
    videos come: 5.4+ Qwen2-VL / Qwen3-VL raise without it, Qwen2.5-VL (5.24) silently falls back
    to 1-D positions. calplug keeps whatever positions the model used; it only says so."""
    if call.get("mm_token_type_ids") is not None:
        return
    if call.get("image_grid_thw") is None and call.get("video_grid_thw") is None:
        return
    if "mm_token_type_ids" not in inspect.signature(type(model).forward).parameters:
        return
    warnings.warn(
        f"{type(model).__name__}: image_grid_thw / video_grid_thw given without mm_token_type_ids; "
        f"transformers {'.'.join(map(str, transformers_version()))} then drops M-RoPE (1-D "
        "positions) or raises. Pass the processor's mm_token_type_ids (0 text, 1 image, 2 video) "
        "to the forward.", UserWarning, stacklevel=4)
