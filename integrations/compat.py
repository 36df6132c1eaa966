"""Version facts of every upstream calplug integrates: each version gate, and each tested version,
is written here once.

* **transformers.** From 4.52 the multimodal models hold the decoder at
  ``model.model.language_model`` and the head at ``model.lm_head``; before, Llava-type models had
  ``model.language_model.model`` / ``model.language_model.lm_head`` and Qwen-VL ``model.model`` /
  ``model.lm_head``; 5.0 removed the old compatibility properties. Also here: the image-token
  config names (``image_token_index`` before 4.52, ``image_token_id`` after: `PLACEHOLDER_NAMES`),
  M-RoPE positions when the decoder was handed ``None`` (4.45-4.46 training forwards), the name of the "only the
  last k logits" argument (``num_logits_to_keep`` in 4.45, ``logits_to_keep`` later), Qwen's
  ``mm_token_type_ids`` (5.3+), rotary tables cut to the sequence length (< 4.38, which the
  LLaVA codebases pin), the decoder of any VLM (`vlm_decoder_and_head`: its accessors, else
  each release's paths), sliding-window / chunked attention spans (`attention_span`), and the
  logit transform after ``lm_head`` (`logit_transform`: scaling, soft-capping, a cut vocabulary). Each transformers class's own release facts (first
  release, broken releases, from when it soft-caps) are columns of the family table,
  `integrations/families.py`, checked through `require_release`. The engine pops
  ``num_items_in_batch`` from the call before the original forward runs, so versions whose
  forward rejects it (Llava 4.45, Qwen2-VL up to 4.52) never receive it.
* **Tested versions.** `TESTED_VERSIONS` (transformers), `TESTED_CODEBASES` (llava-torch, the
  LLaVA-NeXT and MGM commits, TRL), `TESTED_FRAMEWORKS` (axolotl, LLaMA-Factory, ms-swift);
  ``tests/test_layout.py`` fails when tox.ini pins others.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from calplug.classes import first_named
from calplug.errors import CALInputError, UnsupportedModelError
from calplug.gap import LogitTransform
from calplug.hookspecs import VISUAL_MASK_ARGUMENT


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


# The transformers releases the tox matrix runs (tox.ini [testenv:hf-*] and the default env); the
# oldest one per family is the first release that has the family (Qwen3-VL: 4.57.0 was yanked).
TESTED_VERSIONS = ("4.45.2", "4.49.0", "4.57.6", "5.25.0")

# Other codebases and the version (or commit) of each that calplug is tested against: the
# llava-torch wheel (haotian-liu LLaVA, tox -e llava / patches), the LLaVA-VL LLaVA-NeXT and MGM
# source commits (tox -e llava-next / mgm, and the patch files), TRL (tox -e distributed).
TESTED_CODEBASES = {
    "llava-torch": "1.2.2.post1",
    "LLaVA-NeXT": "df17966",
    "MGM": "769820c",
    "trl": "1.16.0",
}

# Training frameworks with an adapter (calplug/frameworks/, docs/frameworks.md): the release each
# tox env runs (tox -e llamafactory / axolotl / swift) and the transformers release it runs on.
TESTED_FRAMEWORKS = {
    "llamafactory": ("0.9.5", "5.6.0"),
    "axolotl": ("0.19.0", "5.16.1"),
    "ms-swift": ("4.6.0", "5.19.0"),
}

def require_release(family: str, minimum: tuple[int, int], broken: tuple = (),
                    broken_below: tuple = (), broken_ranges: tuple = ()) -> None:
    """`require_version` from ``minimum`` up to 6.0, naming the tested releases in that range; a
    ``broken`` release ``((version, reason), ...)`` of the family is refused with its reason, and
    so is every release before ``release`` of ``broken_below`` ``((release, reason), ...)`` and
    every release from ``first`` up to (not including) ``fixed`` of ``broken_ranges``
    ``((first, fixed, reason), ...)`` (a reason may name the installed ``{version}``)."""
    import transformers

    tested = ", ".join(v for v in TESTED_VERSIONS if tuple(map(int, v.split(".")[:2])) >= minimum)
    require_version(family, minimum, tested)
    for version, reason in broken:
        if transformers.__version__ == version:
            raise UnsupportedModelError(f"{family}: {reason}")
    ranges = tuple(((0, 0), release, reason) for release, reason in broken_below) + tuple(broken_ranges)
    for first, fixed, reason in ranges:
        if first <= transformers_version() < fixed:
            raise UnsupportedModelError(f"{family}: " + reason.format(version=transformers.__version__))


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


# Config attributes whose ids mark image and video placeholders, in lookup order: releases before
# 4.52 name them ``*_token_index``, later ones ``*_token_id`` (a config may define both names).
PLACEHOLDER_NAMES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
IMAGE_PLACEHOLDER_NAMES = ("image_token_id", "image_token_index")


def placeholder_positions(config, input_ids: torch.Tensor,
                          names: tuple[str, ...] = PLACEHOLDER_NAMES) -> torch.Tensor:
    """bool ``[B, L]``: the image and video placeholder positions of ``input_ids``, by the
    config's token ids (`PLACEHOLDER_NAMES`, whichever this version uses; a family can name
    others)."""
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for name in names:
        token = getattr(config, name, None)
        if isinstance(token, int):
            visual |= input_ids == token
    return visual


def visual_positions(config, call: dict, names: tuple[str, ...] | None = None) -> torch.Tensor:
    """bool ``[B, L]``: the image and video positions of one forward call, wherever it says them.

    * ``input_ids`` given: its placeholder tokens (`placeholder_positions`, by the config
      attributes ``names``, or the default image / video ones).
    * only ``inputs_embeds`` (images merged before the forward, as ms-swift's Qwen-VL templates
      do): the mask an adapter passed as `VISUAL_MASK_ARGUMENT`, else ``mm_token_type_ids != 0``
      (Qwen-VL on transformers >= 5.3: 0 text, 1 image, 2 video).

    `VISUAL_MASK_ARGUMENT` is removed from ``call`` in every case, so the model never receives
    it. Raises `CALInputError` when nothing says where the images are.
    """
    explicit = call.pop(VISUAL_MASK_ARGUMENT, None)
    input_ids = call.get("input_ids")
    if input_ids is not None:
        return placeholder_positions(config, input_ids, *(() if names is None else (names,)))
    embeds = call.get("inputs_embeds")
    types = call.get("mm_token_type_ids")
    mask = explicit if explicit is not None else (types != 0 if types is not None else None)
    if embeds is None or mask is None:
        raise CALInputError(
            "calplug needs input_ids to locate image positions; pass input_ids instead of "
            "inputs_embeds, or, with pre-merged inputs_embeds, the visual positions as "
            f"mm_token_type_ids (0 text, 1 image, 2 video) or {VISUAL_MASK_ARGUMENT} (bool [B, L])"
        )
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise CALInputError(
            f"the visual-position mask has shape {tuple(mask.shape)} but inputs_embeds is "
            f"{tuple(embeds.shape[:2])} [batch, seq_len]: give one entry per position"
        )
    return mask.to(device=embeds.device, dtype=torch.bool)


def vlm_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The text decoder and output projection of a transformers VLM, for this version.

    The head is ``get_output_embeddings()``. The decoder is what ``get_decoder()`` returns, looked
    through when that is a causal-LM wrapper (Llama4, Llava types and PaliGemma before 4.52: a
    ``*ForCausalLM`` with ``.model`` and ``.lm_head``); where a release has no ``get_decoder`` on
    the class, the attribute paths releases used: ``model.model.language_model`` (>= 4.52),
    ``model.model.text_model`` (Idefics2/3, SmolVLM), ``model.language_model.model`` (< 4.52),
    ``model.model`` (Qwen-VL < 4.52). The decoder is the module with the decoder ``layers`` (a
    model that only holds one, OPT's, is looked through to its ``decoder``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = []
    try:
        candidates.append(model.get_decoder())
    except (AttributeError, NotImplementedError, TypeError):
        pass
    inner = getattr(model, "model", None)
    language_model = getattr(model, "language_model", None)
    candidates += [getattr(inner, "language_model", None), getattr(inner, "text_model", None),
                   getattr(language_model, "model", None), language_model, inner,
                   getattr(model, "text_model", None)]  # Emu3 before 4.50: a ForCausalLM
    for decoder in candidates:
        found = head
        if isinstance(getattr(decoder, "lm_head", None), nn.Module) and hasattr(decoder, "model"):
            # a ForCausalLM wrapper: its decoder (and its head, where the model names none: Emu3 < 4.50)
            found = head if isinstance(head, nn.Module) else decoder.lm_head
            decoder = decoder.model
        if not hasattr(decoder, "layers") and hasattr(getattr(decoder, "decoder", None), "layers"):
            decoder = decoder.decoder  # OPTModel (BLIP-2's language model) holds its OPTDecoder
        if isinstance(decoder, nn.Module) and decoder is not model and hasattr(decoder, "layers") \
                and isinstance(found, nn.Module):
            return decoder, found
    raise UnsupportedModelError(
        f"cannot find the text decoder (a module with decoder layers) and the output projection "
        f"of {type(model).__name__} in this transformers version "
        f"({'.'.join(map(str, transformers_version()))})"
    )


def attention_span(config) -> int | None:
    """The shortest sliding window or attention chunk the text decoder applies, counted in
    sequence indices (None: every layer attends to the whole causal prefix). A window is in use
    when ``layer_types`` lists a sliding or chunked layer, or, for configs without
    ``layer_types``, when ``sliding_window`` is set and ``use_sliding_window`` is not False."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    spans = []
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        if types is not None:
            used = any("sliding" in str(t) for t in types)
        else:
            used = getattr(cfg, "use_sliding_window", True) is not False
        if used:
            spans.append(window)
    chunk = getattr(cfg, "attention_chunk_size", None)
    if isinstance(chunk, int) and chunk > 0 and (types is None or any("chunk" in str(t) for t in types)):
        spans.append(chunk)
    return min(spans) if spans else None


def logit_transform(config, steps) -> LogitTransform | None:
    """The transform the forward applies to ``lm_head``'s output in this release, from the
    family's `families.LogitStep` records and the config's values; None when it applies none."""
    values = {}
    for step in steps:
        if transformers_version() < step.since:
            continue
        value = getattr(text_config(config) if step.on == "text" else config, step.attribute, None)
        if value:  # None / 0: the forwards skip the step
            values[step.op] = int(value) if step.op == "vocab" else float(value)
    found = LogitTransform(**values)
    return None if found.is_identity else found


def mrope_positions(embeds: torch.Tensor) -> torch.Tensor:
    """The M-RoPE positions a Qwen decoder uses when its model hands it ``position_ids=None``
    (the 4.45-4.46 training forwards): 0..L-1 on all three axes, ``[3, B, L]``."""
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


# -- transformers < 4.38 (the LLaVA codebases' pins): rotary tables cut to the sequence length --
def legacy_rotary_modules(decoder: nn.Module) -> list[nn.Module]:
    """Rotary-embedding modules of transformers < 4.38 (``forward(x, seq_len)``): they return the
    cos/sin table cut to the sequence length and the attention indexes it with ``position_ids``.
    Found by signature, not version number, so a backport behaves the same."""
    found = []
    for module in decoder.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            names = list(inspect.signature(module.forward).parameters)
            if names[1:2] == ["seq_len"]:  # 4.38-4.44 take (x, position_ids, seq_len=None)
                found.append(module)
    return found


class KeepPositionsDecoder(nn.Module):
    """The decoder, for the contrast pass on transformers < 4.38: a sequence shortened by the
    ``drop`` contrast keeps its original position ids, which can exceed its length; the rotary
    table is then asked for ``max(position_ids) + 1`` rows instead of ``seq_len``. Values are
    unchanged (the table rows are the same); only the cut is longer."""

    def __init__(self, decoder: nn.Module, rotary: list[nn.Module]):
        super().__init__()
        self.decoder = decoder
        self._rotary = rotary

    def forward(self, **kwargs):
        positions = kwargs.get("position_ids")
        needed = 0 if positions is None else int(positions.max()) + 1

        def longer(module, args, kw):
            if isinstance(kw.get("seq_len"), int) and kw["seq_len"] < needed:
                kw = dict(kw, seq_len=needed)
            elif len(args) > 1 and isinstance(args[1], int) and args[1] < needed:
                args = (args[0], needed) + tuple(args[2:])
            return args, kw

        handles = [m.register_forward_pre_hook(longer, with_kwargs=True) for m in self._rotary]
        try:
            return self.decoder(**kwargs)
        finally:
            for handle in handles:
                handle.remove()


def contrast_decoder(decoder: nn.Module) -> nn.Module:
    """The module the contrast pass calls: the decoder itself, or on transformers < 4.38 the
    decoder with its rotary table lengthened (`KeepPositionsDecoder`)."""
    rotary = legacy_rotary_modules(decoder)
    return KeepPositionsDecoder(decoder, rotary) if rotary else decoder


def facts_row(model: nn.Module, table: dict, integration: str):
    """The row of a kind's facts ``table`` for ``model``'s class (or a class it subclasses); a model
    of no listed class is refused naming the integration and the classes it handles."""
    row = first_named(model, table)
    if row is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a class of calplug's {integration} "
                                    f"integration ({', '.join(table)})")
    return row
