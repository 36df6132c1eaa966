"""Checks of a training batch in the CAL step: bad input is an error or a one-time warning, never
a silently wrong loss.

`calplug.step.training_step` calls three checks (docs/errors.md lists what each says):

* `check_labels`, before the main pass: ``labels`` is a ``torch.long`` tensor ``[batch, seq_len]``
  with ``seq_len >= 2`` (a float tensor, or a length of 1, would otherwise crash deep inside a
  gather or the pooling). Metadata only: no GPU work, no synchronisation.
* `check_label_values`, after the main pass and before anything indexes with the labels: every id
  is ``-100`` or in ``[0, vocab)``, where ``vocab`` is the last dimension of the logits the model
  produced, and no label supervises a position the image fills (the main pass's ``visual_mask``:
  a collator that forgot to mask the image placeholders would train the model to predict them). On a GPU an out-of-range index is a device-side assert that ends the process, so this
  cannot wait. Cost: one pass over the ``[B, L]`` labels and one host synchronisation, which lands
  right where the contrast plan synchronises anyway (it asks whether the batch has image positions).
  A batch without a supervised token gets loss 0 and a one-time `CALWarning`.
* `finite_gaps`, between the gaps and the weights: a NaN or infinite gap (a NaN pixel, fp16
  overflow, diverged weights) would make its weight, and through pooling its neighbours' weights,
  NaN. Such rows are weighted like rows without a contrast value (gap 0); the gaps handed to the
  observers and returned as ``cal_gaps`` keep the value computed, so the problem stays visible.
  Cost: an elementwise pass over ``[B, L-1]`` float32 gaps, and one synchronisation per step until
  the warning has been shown (none after); the loss synchronises a few kernels later anyway.

Warnings are `calplug.CALWarning` (a ``UserWarning``), each kind shown once per process; the
`calplug.trainer.CALStats` observer counts every occurrence (``cal/ignored_batches``,
``cal/nonfinite_gaps``). To stop on them instead: ``warnings.simplefilter("error", calplug.CALWarning)``.
"""
from __future__ import annotations

import torch

from .errors import CALInputError, warn_once, warned
from .gap import IGNORE_INDEX

def check_labels(labels) -> None:
    """``labels`` must be a ``torch.long`` tensor ``[batch, seq_len]`` with batch >= 1 and
    seq_len >= 2. Reads only dtype and shape."""
    if not isinstance(labels, torch.Tensor):
        raise CALInputError(
            f"labels must be a torch tensor of token ids [batch, seq_len], got {type(labels).__name__}: "
            "build them with torch.tensor(..., dtype=torch.long) (your collator should return tensors)")
    if labels.dtype != torch.long:
        kind = "floating-point" if labels.dtype.is_floating_point else "non-int64"
        raise CALInputError(
            f"labels must hold integer token ids as torch.long (int64; -100 = ignored), got "
            f"{kind} {labels.dtype}: convert them with labels.long() (float labels often come from "
            "a collator that stacked them with float tensors, or from torch.full without a dtype)")
    if labels.dim() != 2:
        fix = "add the batch dimension: labels[None]" if labels.dim() == 1 else \
            "give one row of labels per sample"
        raise CALInputError(
            f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}: {fix}")
    if labels.shape[0] == 0:
        raise CALInputError("labels hold no sample (batch size 0): skip empty batches in your data loader")
    if labels.shape[1] < 2:
        raise CALInputError(
            f"labels have sequence length {labels.shape[1]}: a causal language model predicts each "
            "token from the ones before it, so a sequence needs at least 2 tokens to have anything "
            "to learn. Drop or merge sequences this short (check the tokenizer's truncation / max_length)")


def check_label_values(labels: torch.Tensor, vocab: int,
                       visual_mask: torch.Tensor | None = None) -> int:
    """Every id of the (decoder-aligned) ``labels`` is -100 or in ``[0, vocab)``, and (with the
    main pass's ``visual_mask``) no label supervises a position the image fills; returns the
    number of supervised rows (labels after the shift that are not -100). One synchronisation."""
    shifted = labels[:, 1:]
    ids = labels.masked_fill(labels == IGNORE_INDEX, 0)
    counts = [ids.min(), ids.max(), (shifted != IGNORE_INDEX).sum()]
    if visual_mask is not None:
        counts.append(((shifted != IGNORE_INDEX) & visual_mask[:, 1:].to(torch.bool)).sum())
    low, high, supervised, *on_image = torch.stack(counts).tolist()
    if low < 0:
        raise CALInputError(
            f"labels hold {low}, a negative id other than -100: only -100 marks a position the loss "
            "ignores (transformers uses the same value). Replace other negative values by -100")
    if high >= vocab:
        raise CALInputError(
            f"labels hold token id {high}, but the model's vocabulary has {vocab} entries (ids 0 to "
            f"{vocab - 1}): the labels were made with another tokenizer, or tokens were added to the "
            "tokenizer without model.resize_token_embeddings(len(tokenizer))")
    if on_image and on_image[0]:
        raise CALInputError(
            f"labels supervise {on_image[0]} positions that the image fills (image placeholder or "
            "video tokens): the collator did not set the labels of the image tokens to -100, so "
            "training would teach the model to predict placeholder tokens, and CAL would weight "
            "those rows by a gap that compares the placeholder's logit with and without the image. "
            "Set labels to -100 wherever input_ids holds the image (or video) token id, e.g. "
            "labels[input_ids == image_token_id] = -100 (docs/errors.md)")
    if supervised == 0:
        warn_once("ignored_batch", message=(
            "calplug: a training batch has no supervised token (every label after the shift is -100). "
            "CAL gives it loss 0 and no gradient, where the model's own loss would be NaN (a mean over "
            "no tokens; 0 under the HF Trainer's num_items_in_batch). Often a masking bug: answers "
            "truncated away by max_length, or a chat template that masks everything. Counted in "
            "cal/ignored_batches; shown once."))
    return int(supervised)


def finite_gaps(gaps: torch.Tensor, main_logits: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """``gaps`` with every non-finite value replaced by 0 (the gap of a row without a contrast
    value), for the weighting. Warns once when a supervised row had one, naming the likely cause."""
    finite = torch.isfinite(gaps)
    if not warned("nonfinite_gap"):
        bad, bad_main = torch.stack([(~finite & supervised).sum(),
                                     (~torch.isfinite(main_logits) & supervised).sum()]).tolist()
        if bad:
            cause = (f"{bad_main} of them in the model's own forward (the main pass), so the loss is "
                     "not finite, as the model's own loss is not either" if bad_main else
                     "all in the contrast pass; the main pass is finite, so the loss stays finite")
            warn_once("nonfinite_gap", message=(
                f"calplug: {bad} supervised rows of a training batch have a non-finite gap (NaN or "
                f"inf), {cause}. They are weighted as rows without a contrast value (gap 0), so CAL "
                "adds no NaN of its own. Likely causes: NaN or inf in pixel_values (check "
                "torch.isfinite(pixel_values).all() in the data pipeline), fp16 overflow (train in "
                "bf16 or fp32), or diverged weights. Counted in cal/nonfinite_gaps; shown once."))
    return torch.where(finite, gaps, torch.zeros_like(gaps))
