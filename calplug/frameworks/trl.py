"""TRL (and the HF Trainer it builds on): what calplug's step must know about how they call the
model. Facts only; no TRL import.

TRL's SFTTrainer (1.x) computes its own cross-entropy: it runs the backbone through a fused LM
head (``model(..., fused_lm_head=True)``) and ignores the loss the model returns. A training call
that asks for the fused head would discard the CAL loss, so it is refused, naming the fix
(`calplug.trainer.enable_for_trainer` makes the trainer optimise the model's loss).
"""
from __future__ import annotations

from ..errors import CALConfigError
from ..hookspecs import Framework

FUSED_HEAD_ARGUMENT = "fused_lm_head"


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
                own_loss_trainers=("SFTTrainer",), check_call=check_call)
