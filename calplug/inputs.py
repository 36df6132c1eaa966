"""What a forward call's keyword arguments say about images: which arguments carry pixels or
image features, written once for the step's guards, the integrations and ``verify``.

Forwards take pixels as ``pixel_values`` and relatives (``pixel_values_videos``,
``pixel_values_images``, ...), the LLaVA codebases as ``images`` / ``images_aux``; some take image
features ready-made (``image_embeds``, ``mm_encoder_outputs``). None of this is model knowledge
that differs per family: it is the vocabulary forward calls share.
"""
from __future__ import annotations

import torch

PIXEL_PREFIX = "pixel_values"
# Arguments beside pixel_values* that carry an image: the LLaVA codebases' pixels, ready features,
# and Fuyu's patches before transformers renamed them pixel_values (5.2x).
IMAGE_ARGUMENTS = ("images", "images_aux", "image_embeds", "mm_encoder_outputs", "image_patches")
# Pixels cut into patches under another name: Fuyu's image_patches, and flattened patches each led
# by the patch's row and column index (the Pix2Struct processors' layout, which Kosmos-2.5 takes).
PATCH_ARGUMENTS = ("image_patches", "flattened_patches")


def image_keys(call: dict) -> tuple[str, ...]:
    """The arguments of ``call`` that can carry an image: ``pixel_values*`` and `IMAGE_ARGUMENTS`."""
    return tuple(k for k in call if k.startswith(PIXEL_PREFIX) or k in IMAGE_ARGUMENTS)


def has_pixels(call: dict, keys: tuple[str, ...] | None = None) -> bool:
    """Whether ``call`` holds a non-empty tensor (or a list of them) under ``keys`` (default:
    `image_keys`)."""
    for key in image_keys(call) if keys is None else keys:
        value = call.get(key)
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            return True
        if isinstance(value, (list, tuple)) and any(
                isinstance(v, torch.Tensor) and v.numel() > 0 for v in value):
            return True
    return False


def has_float_pixels(value) -> bool:
    """Whether ``value`` (a tensor or a list of them) holds floating-point pixels to transform."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and value.numel() > 0
    return isinstance(value, (list, tuple)) and any(has_float_pixels(v) for v in value)


def pixel_keys(call: dict) -> tuple[str, ...]:
    """The arguments of ``call`` that hold floating-point pixels (``pixel_values*`` and
    `PATCH_ARGUMENTS`): what ``verify`` replaces with other pixels of the same layout."""
    return tuple(k for k, v in call.items()
                 if (k.startswith(PIXEL_PREFIX) or k in PATCH_ARGUMENTS) and has_float_pixels(v))
