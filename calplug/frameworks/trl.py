"""TRL (and the HF Trainer it builds on): what calplug's step must know about how they call the
model. Facts only; no TRL import.

TRL's SFTTrainer (1.x) computes its own cross-entropy: it runs the backbone through a fused LM
head (``model(..., fused_lm_head=True)``) and ignores the loss the model returns. A training call
that asks for the fused head would discard the CAL loss, so it is refused, naming the fix
(`calplug.trainer.enable_for_trainer` makes the trainer optimise the model's loss).

Its ``loss_type`` other than ``"nll"`` (``"dft"``: DFT reweights each token by its own
probability) is a loss computed from the logits in place of the model's: with CAL's loss taken
instead it would be silently ignored, so it is refused before training.
"""
from __future__ import annotations

from ..classes import is_named
from ..errors import CALConfigError
from ..hookspecs import Framework

FUSED_HEAD_ARGUMENT = "fused_lm_head"


def check_trainer(trainer) -> None:
    """`Framework.check_trainer` of TRL: an SFTTrainer whose ``loss_type`` is not ``"nll"``."""
    if not is_named(trainer, ("SFTTrainer",)):
        return
    loss_type = getattr(getattr(trainer, "args", None), "loss_type", None)
    if loss_type not in (None, "nll"):
        raise CALConfigError(
            f"TRL: CAL cannot run with loss_type={loss_type!r}: the SFTTrainer computes that loss "
            "from the logits in place of the model's, and calplug makes the trainer optimise the "
            "CAL loss, so the option would be silently ignored. Set loss_type='nll', or turn CAL off"
        )


def check_call(call: dict) -> None:
    """`Framework.check_call` of TRL: a forward called with the fused LM head is refused."""
    if call.get(FUSED_HEAD_ARGUMENT):
        raise CALConfigError(
            f"this training forward was called with {FUSED_HEAD_ARGUMENT}=True: the caller (TRL's "
            "SFTTrainer) computes its own cross-entropy through a fused LM head and would ignore "
            "the CAL loss. Build the trainer first, then call "
            "calplug.trainer.enable_for_trainer(trainer) (docs/distributed.md)"
        )


TRL = Framework("TRL", packing_off="padding_free=False, packing=False",
                own_loss_trainers=("SFTTrainer",), check_call=check_call,
                check_trainer=check_trainer)
