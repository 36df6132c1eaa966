"""Forward diffusion of image tensors: VCD's "distorted image" contrast (Leng et al., CVPR 2024).
Pure tensor code.

VCD contrasts the next-token logits with the image against those with a noised image, the image
after ``t`` steps of a DDPM forward process: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) e``,
``e ~ N(0, I)``, with ``abar_t`` the product of ``1 - beta_s`` over the first ``t + 1`` steps. The
schedule is VCD's: 1000 steps, ``beta`` rising along a sigmoid of ``linspace(-6, 6)`` from 1e-5
to 5e-3. At its default step, 500, ``x_t = 0.863 x_0 + 0.505 e``; at step 999, ``0.285 x_0 + 0.959 e``.
The noise is added to the pixels the model receives (normalised), as VCD does.
"""
from __future__ import annotations

import torch

STEPS = 1000
BETA_MIN, BETA_MAX = 1e-5, 5e-3


def kept_share(step: int) -> float:
    """``sqrt(abar_step)``: how much of the image survives ``step`` steps (float64 schedule)."""
    if not 0 <= step < STEPS:
        raise ValueError(f"noise step must be in [0, {STEPS}), got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, STEPS, dtype=torch.float64)) * (BETA_MAX - BETA_MIN) + BETA_MIN
    return float(torch.cumprod(1 - betas, 0)[step].sqrt())


def diffuse(pixels: torch.Tensor, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``pixels`` after ``step`` forward-diffusion steps (any shape; the noise is drawn on the CPU
    from ``generator``, so a seed gives the same noise on every device)."""
    keep = kept_share(step)
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noised = keep * pixels.float() + (1.0 - keep * keep) ** 0.5 * noise.to(pixels.device)
    return noised.to(pixels.dtype)
