"""One rank of a two-rank HF Trainer run with CAL: DDP over gloo on CPU, the way `torchrun
--nproc_per_node 2 train.py` (or a multi-node launch) starts a Trainer script.

Launched by tests/distributed/test_trainer.py with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set. Each rank runs one optimizer step of two accumulated micro-batches
and writes ``trainer_rank{r}.pt``: its micro-batches, the ``num_items_in_batch`` its forwards
received, the (all-reduced) gradients before the optimizer step, and the Trainer's first log.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _hf  # noqa: E402

import calplug  # noqa: E402
from calplug.trainer import enable_for_trainer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    from transformers import Trainer

    model = _common.make_model()
    collator = _hf.RecordingCollator()
    grads = _hf.GradsAtFirstStep()
    training_args = _hf.training_args(os.path.join(args.out, "trainer"), ddp_backend="gloo",
                                      ddp_find_unused_parameters=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=_hf.samples(model),
                      data_collator=collator, callbacks=[grads])
    enable_for_trainer(trainer)
    assert calplug.is_enabled(model)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, k: seen.append(int(k["num_items_in_batch"])), with_kwargs=True)
    trainer.train()
    torch.save({"world_size": trainer.args.world_size, "batches": collator.batches[:2],
                "num_items_in_batch": seen, "grads": grads.grads,
                "log": trainer.state.log_history[0]},
               os.path.join(args.out, f"trainer_rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
