"""Steps 3-4 of docs/cal.md: shifted targets, and how much the image raised each target's logit.

Pure tensor code. The contrast side never materialises ``[N, V]`` logits: a row's target logit is
its final hidden state dotted with that token's ``lm_head`` row (plus bias), which is all the gap
needs. The main side reads target logits out of the logits the model already produced (a gather,
no copy of the full tensor).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_ROWS = 4096  # bounds the [rows, d] gather of lm_head rows


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift labels as for causal-LM loss.

    Returns ``(shifted_labels [B, L-1], targets [B, L-1], supervised [B, L-1])``: row i predicts
    token i+1; ``targets`` replaces every ignored (negative) label by token 0, as published.
    """
    shifted = labels[:, 1:]
    supervised = shifted != IGNORE_INDEX
    targets = torch.where(shifted < 0, torch.zeros_like(shifted), shifted)
    return shifted, targets, supervised


def main_target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, L-1]`` logit of each row's target in the main pass's ``[B, L, V]`` logits."""
    return logits[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()


def hidden_target_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[M]`` logits of ``targets [M]`` from final hidden states ``[M, d]``.

    Equal to ``(hidden @ weight.T + bias)[arange(M), targets]`` without the ``[M, V]`` product;
    computed in float32 (the published code upcasts logits to float32 before the gap). With
    ``rows [M]``, ``hidden`` holds ``[H, d]`` states and row m uses ``hidden[rows[m]]`` (many rows
    can share a state); the ``[M, d]`` selection is then made chunk by chunk, never in full.
    """
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], _CHUNK_ROWS):
        t = targets[start:start + _CHUNK_ROWS]
        w = weight.index_select(0, t).float()
        h = hidden[start:start + _CHUNK_ROWS] if rows is None \
            else hidden.index_select(0, rows[start:start + _CHUNK_ROWS])
        out[start:start + _CHUNK_ROWS] = (h.float() * w).sum(-1)
    if bias is not None:
        out += bias.index_select(0, targets).float()
    return out


def _rows_per_chunk(vocab: int) -> int:
    """Rows whose float32 ``[rows, V]`` logits fit in about 128 MiB."""
    return max(1, (32 * 2 ** 20) // max(vocab, 1))


def hidden_lse(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               rows: torch.Tensor, transform=None) -> torch.Tensor:
    """float32 ``[M]`` log-sum-exp over the vocabulary of rows ``rows [M]`` of the final hidden
    states ``hidden [H, d]`` (``transform`` applied to the logits first: the model's soft-capping
    or scaling). Vocabulary-sized logits exist for one chunk of rows at a time (about 128 MiB),
    never for all ``M``; a target's log-probability is its logit minus this. For scoring and
    decoding, not the training step (which needs no softmax on the contrast side)."""
    lse = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    step = _rows_per_chunk(weight.shape[0])
    for start in range(0, rows.shape[0], step):
        logits = hidden.index_select(0, rows[start:start + step]).float() @ weight.float().T
        if bias is not None:
            logits += bias.float()
        if transform is not None:
            logits = transform(logits)
        lse[start:start + step] = torch.logsumexp(logits, dim=-1)
    return lse


def logits_lse(logits: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, L-1]`` log-sum-exp over the vocabulary of the shifted rows of ``[B, L, V]``
    logits, one chunk of rows at a time (no float32 copy of the whole tensor)."""
    B, L, V = logits.shape
    out = torch.empty(B, L - 1, dtype=torch.float32, device=logits.device)
    step = _rows_per_chunk(V)
    for b in range(B):
        for start in range(0, L - 1, step):
            end = min(start + step, L - 1)
            out[b, start:end] = torch.logsumexp(logits[b, start:end].float(), dim=-1)
    return out


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Final logit soft-capping, ``tanh(logits / cap) * cap`` (Gemma-type forwards apply it to
    ``lm_head``'s output; the contrast side's target logits get the same, elementwise)."""
    return torch.tanh(logits / cap) * cap


def target_gap(main_logits: torch.Tensor, targets: torch.Tensor, contrast_logits: torch.Tensor,
               has_contrast: torch.Tensor) -> torch.Tensor:
    """Step 4: ``gap = main - contrast`` on rows with a contrast value, 0 elsewhere (float32 ``[B, L-1]``)."""
    gaps = torch.zeros_like(main_logits)
    gaps[has_contrast] = main_logits[has_contrast] - contrast_logits
    return gaps
