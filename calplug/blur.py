"""Gaussian blur of image tensors (the paper's blur contrast, Table 9). Pure tensor code."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur over the last two dimensions (H, W) of ``[..., H, W]``; reflect padding.

    The kernel sums to 1, so blurring normalised pixels equals normalising blurred pixels.
    A kernel wider than the image is clipped to what reflect padding allows.
    """
    *lead, H, W = pixels.shape
    x = pixels.reshape(-1, 1, H, W).float()
    k = gaussian_kernel(sigma, device=pixels.device)
    r = min(k.numel() // 2, H - 1, W - 1)
    center = k.numel() // 2
    k = k[center - r:center + r + 1]
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.reshape(*lead, H, W).to(pixels.dtype)
