"""Step 7 of docs/cal.md: the weighted, normalised cross-entropy
``sum_i(ce_i * w_i) / (sum_{i supervised} w_i + 1e-6)``.

Memory is why it looks the way it does: the logits are used as the model produced them (never
sliced into a shifted copy), and the cross-entropy runs on the supervised rows only, where
transformers' own loss upcasts and log-softmaxes all ``B * L`` rows; ignored rows contribute 0
either way, so the value is the same. The chunked variant (``loss_chunk``) never makes
``[B, L, V]`` logits at all. Figures: docs/performance.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gap import IGNORE_INDEX

EPS = 1e-6


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Scalar CAL loss for one micro-batch.

    Without ``num_items_in_batch`` this is step 7's loss: the weighted mean over this
    micro-batch's supervised rows. With it (the HF Trainer passes the supervised-token count of
    the whole accumulated batch, and then does *not* divide by the accumulation steps), the
    micro-batch's weighted mean is scaled by its share of those tokens, so the accumulated
    gradient is the token-weighted average of the micro-batch CAL losses; with one micro-batch
    the two are identical.
    """
    supervised = labels[:, 1:] != IGNORE_INDEX                      # row i predicts token i + 1
    b, i = supervised.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[b, i].float(), labels[b, i + 1], reduction="none")
    w = weights.detach().float()[b, i]
    loss = (ce * w).sum() / (w.sum() + EPS)
    return scale_to_batch_share(loss, supervised, num_items_in_batch)


def scale_to_batch_share(loss: torch.Tensor, supervised: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """Scale a micro-batch's weighted mean by its share of the accumulated batch's supervised
    tokens (the HF Trainer's ``num_items_in_batch``); unchanged when that is None."""
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss * supervised.sum() / num_items_in_batch


# -- chunked path: no full logits ----------------------------------------------------------------
class _ChunkedWeightedCE(torch.autograd.Function):
    """``sum_i w_i * ce_i`` over rows of ``hidden [N, d]`` against ``labels [N]`` with the output
    projection ``weight [V, d]`` (+ ``bias``), computed ``chunk`` rows at a time.

    Like Liger-Kernel's fused linear cross-entropy, the gradients are computed in the forward,
    chunk by chunk (softmax minus one-hot, times the row weight), so no ``[N, V]`` tensor is ever
    alive: the largest temporary is one chunk's ``[chunk, V]`` float32 logits. The backward only
    scales the stored gradients by the incoming scalar gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weights, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            y = labels[start:end]
            valid = y != IGNORE_INDEX
            if not bool(valid.any()):
                continue  # no loss and no gradient from these rows
            h = hidden[start:end]
            # The model's own path: lm_head in the model's dtype, then float32 for the loss.
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            y0 = torch.where(valid, y, torch.zeros_like(y))
            z = logits.gather(1, y0.unsqueeze(1)).squeeze(1)
            w = torch.where(valid, row_weights[start:end].float(), torch.zeros_like(lse))
            total += ((lse - z) * w).sum()
            if need_h or need_w or need_b:
                grad = logits.sub_(lse.unsqueeze(1)).exp_()            # softmax, in place
                grad[torch.arange(grad.shape[0], device=grad.device), y0] -= 1.0
                grad.mul_(w.unsqueeze(1))
                if need_b:
                    grad_b += grad.sum(0)
                grad = grad.to(hidden.dtype)
                if need_h:
                    grad_h[start:end] = grad @ weight.to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(grad.t().float(), h.float())
            del logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_output
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(w_dtype),
                None if grad_b is None else (grad_b * scale).to(b_dtype),
                None, None, None)


def chunked_weighted_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   labels: torch.Tensor, weights: torch.Tensor, chunk: int,
                                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """`weighted_cross_entropy` computed from the final hidden states ``[B, L, d]`` and the
    ``lm_head`` parameters, ``chunk`` rows at a time, never materialising ``[B, L, V]`` logits.

    Equal to ``weighted_cross_entropy(hidden @ weight.T + bias, labels, weights, ...)`` up to
    float round-off, in value and in gradients (with respect to ``hidden``, ``weight``, ``bias``).
    """
    supervised = labels[:, 1:] != IGNORE_INDEX                      # row i predicts token i + 1
    b, i = supervised.nonzero(as_tuple=True)
    w = weights.detach().float()[b, i]
    # Only supervised rows go through the output projection: the others carry no loss.
    total = _ChunkedWeightedCE.apply(hidden[b, i], weight, bias, labels[b, i + 1], w, int(chunk))
    loss = total / (w.sum() + EPS)
    return scale_to_batch_share(loss, supervised, num_items_in_batch)
