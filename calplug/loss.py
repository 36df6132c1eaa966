"""The weighted, normalised cross-entropy of the spec (step 7).

``loss = sum_i(ce_i * w_i) / (sum_{i supervised} w_i + 1e-6)``.

Memory: the logits are used as the model produced them. Instead of slicing ``logits[:, :-1]``
(which forces a copy of ``[B, L-1, V]`` when flattened), the labels are shifted left and padded
with the ignore index, exactly like transformers' own causal-LM loss. The only full-size
temporaries are those ``F.cross_entropy`` makes, which the unmodified baseline makes too (plus the
float32 upcast of half-precision logits that the baseline's loss also performs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gap import IGNORE_INDEX

EPS = 1e-6


def per_row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, L]`` cross-entropy of row i against label i+1 (0 where ignored or last)."""
    B, L, V = logits.shape
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    ce = F.cross_entropy(logits.reshape(B * L, V).float(), shifted.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(B, L)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Scalar CAL loss for one micro-batch.

    Without ``num_items_in_batch`` this is the spec's loss: the weighted mean over this
    micro-batch's supervised rows. With it (the HF Trainer passes the supervised-token count of
    the whole accumulated batch, and then does *not* divide by the accumulation steps), the
    micro-batch's weighted mean is scaled by its share of those tokens, so the accumulated
    gradient is the token-weighted average of the micro-batch CAL losses; with one micro-batch
    the two are identical.
    """
    ce = per_row_cross_entropy(logits, labels)[:, :-1]
    weights = weights.detach().to(ce.dtype)
    supervised = labels[:, 1:] != IGNORE_INDEX
    loss = (ce * weights).sum() / (weights[supervised].sum() + EPS)
    if num_items_in_batch is not None:
        n_local = supervised.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss * n_local / num_items_in_batch
    return loss
