"""Two ways CAL can go wrong without an error, caught at the step: packed batches, and steps that
never find an image.

* **Packed / padding-free batches** (the frameworks' packing options: each registered
  `calplug.hookspecs.Framework` names its own, and the error lists them) put several samples into
  one row. calplug's contrasts take the row as one sequence with a 2-D padding mask:
  ``drop`` removes every image of the row for every text token in it, and the flat pooling runs
  across the samples' boundaries, so the gaps would mix samples. Such batches are refused at the
  first step, naming the options to turn off. They are recognised by what the decoder is given:
  a 4-D (block-diagonal) attention mask, flash-attention sequence boundaries (``cu_seq_lens_q``,
  ``cu_seqlens``), or positions that fall back on every axis at once inside a row.
* **Steps that never find an image.** A model whose placeholder ids do not match its tokenizer,
  or a pipeline that merges the images before the forward without saying where they went,
  gives calplug batches that carry pixels but no image positions: every gap is 0, every weight
  ``alpha``, and training is plain cross-entropy (reweighted by ``alpha``). `NoImageWatch` warns
  once when that lasts `NO_IMAGE_STEPS` CAL steps in a row.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from . import plugins
from .errors import CALInputError, CALWarning
from .inputs import has_pixels

# Keyword arguments with which packed rows tell flash attention where each sample starts.
SEQUENCE_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "cu_seqlens_q")


def packing_fix() -> str:
    """How to turn packing off, in the words of every registered framework."""
    options = "; ".join(f"{f.name}: {f.packing_off}" for f in plugins.frameworks() if f.packing_off)
    return ("calplug's contrasts need one sample per row: turn packing off"
            + (f" ({options})" if options else ""))


def refuse_packed_call(call: dict) -> None:
    """Refuse a forward call that packs samples by its mask or flash-attention boundaries."""
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        raise CALInputError(
            f"attention_mask of shape {tuple(mask.shape)} is a 4-D (block-diagonal) mask, the "
            f"form packed batches take (LLaMA-Factory neat_packing). {packing_fix()}"
        )
    given = [k for k in SEQUENCE_BOUNDARY_KEYS if call.get(k) is not None]
    if given:
        raise CALInputError(
            f"this batch gives {', '.join(given)}: several samples packed into one row "
            f"(padding-free training). {packing_fix()}"
        )


def refuse_restarting_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Refuse rows whose positions fall back inside the row: a second sample starts there.

    ``position_ids``: what the decoder used, ``[B, L]`` or ``[k, B, L]`` (M-RoPE). Within one
    sample no axis needs to be monotone (an image's height and width positions wrap row by row,
    Qwen2.5-VL's temporal positions run ahead of the text after a video), but every axis never
    falls back at once: text continues after the largest position so far. A packed row's next
    sample starts again at 0 on every axis. Only attended positions count (padding on either
    side, or held out in the middle, is fine).
    """
    positions = position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0)
    if tuple(positions.shape[1:]) != tuple(attention_mask.shape) or positions.shape[-1] < 2:
        return
    attended = attention_mask.bool()
    B, L = attended.shape
    index = torch.arange(L, device=attended.device).expand(B, L)
    last = torch.where(attended, index, torch.full_like(index, -1)).cummax(dim=-1).values
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # previous attended
    gathered = positions.expand(positions.shape[0], B, L).gather(
        -1, before.clamp(min=0).expand(positions.shape[0], B, L))
    restart = attended & (before >= 0) & (positions < gathered).all(dim=0)
    if bool(restart.any()):
        b, i = (int(x) for x in restart.nonzero()[0])
        j = int(before[b, i])
        raise CALInputError(
            f"positions restart inside row {b} (at index {i}, position "
            f"{positions[:, b, i].tolist()} after {positions[:, b, j].tolist()}): this batch packs "
            f"several samples into one row. {packing_fix()}"
        )


# -- steps without image positions -----------------------------------------------------------
NO_IMAGE_STEPS = 8  # CAL steps in a row that carry images but find no image position


def carries_images(call: dict) -> bool:
    """Whether a forward call holds pixels (``pixel_values*``, LLaVA codebases' ``images``), or
    embeddings without ``input_ids`` (images possibly merged before the forward)."""
    if call.get("input_ids") is None and call.get("inputs_embeds") is not None:
        return True
    return has_pixels(call)


@dataclasses.dataclass
class NoImageWatch:
    """Counts CAL steps in a row whose batch carried images but whose image positions were none."""

    steps: int = 0
    warned: bool = False

    def observe(self, carried_images: bool, with_image: torch.Tensor, model_name: str) -> None:
        if not carried_images or bool(with_image.any()):
            self.steps = 0
            return
        self.steps += 1
        if self.steps >= NO_IMAGE_STEPS and not self.warned:
            self.warned = True
            warnings.warn(
                f"calplug: {self.steps} CAL training steps in a row on {model_name} carried images "
                "(pixel values, or inputs_embeds without input_ids) but calplug found no image "
                "position in them, so CAL changed nothing: every gap is 0 and every weight is "
                "alpha, i.e. plain cross-entropy. Check that the model config's image token id "
                "(image_token_id / image_token_index) is the id the tokenizer gives the image "
                "placeholder, and that a pipeline merging images before the forward passes "
                "mm_token_type_ids or calplug_visual_mask. (If these batches are text-only with "
                "dummy images, ignore this.) The logging callback's cal/share_contrasted shows "
                "the share of supervised tokens that got a contrast.",
                CALWarning, stacklevel=2)
