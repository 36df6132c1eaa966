"""Liger Kernel with CAL: which of its kernels compose with the CAL loss and which are refused, in
each trainer's spelling. Facts only; no Liger import (its Triton kernels need a GPU).

Liger's layer kernels (RMSNorm, LayerNorm, RoPE, SwiGLU / GeGLU) replace modules inside the model
with kernels computing the same functions: the main pass and the contrast pass both run them, and
the CAL loss is computed from the logits as without them. They compose.

Its two loss kernels do not:

* ``fused_linear_cross_entropy`` (on by default in every ``apply_liger_kernel_to_*``) replaces the
  model's ``forward`` with one that, in training with labels, computes its own unweighted
  cross-entropy from the hidden states and returns no logits. Per-token weights cannot enter it
  (Liger-Kernel #338; #968: ``reduction='none'`` times a weight mask gives wrong gradients).
  Applied to a model after ``calplug.enable`` it replaces the CAL step's forward, so CAL never runs;
  applied before, calplug calls it without labels and it computes the full logits, so it saves
  nothing. calplug's own ``loss_chunk`` is the replacement of the same memory class: the weighted
  cross-entropy in chunks of rows, without the ``[B, L, V]`` logits.
* ``cross_entropy`` replaces ``torch.nn.functional.cross_entropy`` for the whole process (Liger
  patches the module attribute), so calplug's weighted loss would run through Liger's
  ``reduction='none'`` path, whose weighted gradients are wrong (#968).

So both are refused, naming the option and the fix; the layer kernels pass.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import CALConfigError
from ..hookspecs import Framework

# Liger's loss kernels and their defaults in ``apply_liger_kernel_to_<model>(...)`` (0.3 to 0.8.5):
# what a trainer applies when its config leaves them unset.
LOSS_KERNELS = {"fused_linear_cross_entropy": True, "cross_entropy": False}
WHY = {  # each completes "that kernel ..." / "and it ..."
    "fused_linear_cross_entropy": (
        "replaces the model's forward with one that computes its own unweighted cross-entropy "
        "without logits, which CAL's per-token weights cannot enter (Liger-Kernel #338): applied "
        "after calplug.enable it removes the CAL step, applied before it saves nothing"),
    "cross_entropy": (
        "replaces torch.nn.functional.cross_entropy for the whole process, and its "
        "reduction='none' path, which a weighted loss needs, gives wrong gradients (Liger-Kernel #968)"),
}
LOSS_CHUNK_HINT = ("for the memory Liger's fused loss saves, set calplug's loss_chunk (e.g. 1024): "
                   "CAL's weighted cross-entropy in chunks, without the [B, L, V] logits")


def loss_kernels_on(kernels: Mapping[str, Any] | None) -> list[str]:
    """The Liger loss kernels a kernel config (``{"rms_norm": True, ...}`` as passed to
    ``apply_liger_kernel_to_*``; None or missing keys take Liger's defaults) switches on."""
    kernels = dict(kernels or {})
    return [name for name, default in LOSS_KERNELS.items() if bool(kernels.get(name, default))]


def refusal(framework: str, option: str, kernel: str, fix: str) -> CALConfigError:
    """The error for a Liger loss kernel switched on through ``option`` (the framework's spelling)."""
    return CALConfigError(
        f"{framework}: CAL cannot run with {option}: Liger's {kernel} kernel is on, and it {WHY[kernel]}. "
        f"{fix}; Liger's other kernels (RMSNorm, RoPE, SwiGLU, LayerNorm) compose with CAL, and "
        f"{LOSS_CHUNK_HINT}. Or turn CAL off."
    )


LAYER_ONLY = {"fused_linear_cross_entropy": False, "cross_entropy": False}
TRAINER_OFF = 'liger_kernel_config={"fused_linear_cross_entropy": False, "cross_entropy": False}'
YAML_OFF = "liger_kernel_config: {fused_linear_cross_entropy: false, cross_entropy: false}"


def check_kernel_config(framework: str, option: str, kernels: Mapping[str, Any] | None,
                        off: str = TRAINER_OFF) -> None:
    """Refuse ``kernels`` (Liger's ``apply_liger_kernel_to_*`` arguments, as the trainer will pass
    them) when a loss kernel is on; ``option`` is how the user switched Liger on and ``off`` the
    setting that keeps Liger without its loss kernels, in the framework's spelling."""
    on = loss_kernels_on(kernels)
    if on:
        raise refusal(framework, option, on[0], f"Keep Liger and switch its loss kernels off with {off}")


def check_trainer(trainer) -> None:
    """`Framework.check_trainer` for the HF Trainer's ``use_liger_kernel`` / ``liger_kernel_config``
    (TRL's SFTTrainer and ms-swift's trainers read the same arguments)."""
    args = getattr(trainer, "args", None)
    if not getattr(args, "use_liger_kernel", False):
        return
    check_kernel_config("Liger Kernel", "use_liger_kernel=True", getattr(args, "liger_kernel_config", None))


LIGER_KERNEL = Framework("Liger Kernel", check_trainer=check_trainer)
