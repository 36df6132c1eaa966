"""Steps 5-6 of docs/cal.md: clamp each gap to ``[alpha, beta]``, then average-pool the weights.

Pure tensor code, no gradient. ``scope="flat"`` pools the flattened batch as published (across
ignored rows and sequence boundaries); ``"sequence"`` pools within each sequence over supervised
rows only (docs/cal.md compares them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def clamp_and_pool(gaps: torch.Tensor, supervised: torch.Tensor, *, alpha: float, beta: float,
                   window: int, scope: str = "flat") -> torch.Tensor:
    """float32 ``[B, T]`` weights from gaps ``[B, T]``."""
    weights = gaps.float().clamp(min=alpha, max=beta)
    if window == 1:
        return weights
    pad = window // 2
    if scope == "flat":
        flat = weights.reshape(1, 1, -1)
        pooled = F.avg_pool1d(flat, kernel_size=window, stride=1, padding=pad, count_include_pad=False)
        return pooled.reshape(weights.shape)
    if scope == "sequence":
        mask = supervised.float()
        ones = torch.ones(1, 1, window, dtype=weights.dtype, device=weights.device)
        num = F.conv1d((weights * mask).unsqueeze(1), ones, padding=pad).squeeze(1)
        den = F.conv1d(mask.unsqueeze(1), ones, padding=pad).squeeze(1)
        return torch.where(supervised, num / den.clamp(min=1.0), weights)
    raise ValueError(f"unknown pool scope {scope!r}")
