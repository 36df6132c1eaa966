"""Gap -> weight: clamp to ``[alpha, beta]``, then average-pool (the spec's steps 5 and 6).

Pure tensor code, no gradient. Two pooling scopes:

* ``flat`` (as published): one vector of all ``B * (L-1)`` rows, pooled with kernel ``w``, stride 1,
  padding ``w // 2``, padding not counted. It runs across ignored rows and across the boundary
  between one sequence and the next.
* ``sequence``: each row averages the clamped weights of the *supervised* rows within the window
  in its own sequence (rows that are not supervised keep their clamped value; they carry no loss).
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
