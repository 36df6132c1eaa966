"""One rank of a two-rank HF Trainer run with CAL: DDP over gloo on CPU, the way `torchrun
--nproc_per_node 2 train.py` (or a multi-node launch) starts a Trainer script; with ``--fsdp 2``
the Trainer's FSDP settings instead (``fsdp="full_shard auto_wrap"``, ``fsdp_config`` with
``fsdp_version: 2``), which accelerate turns into FSDP2 ``fully_shard`` units.

Launched by tests/distributed/test_trainer.py with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set. Each rank runs one optimizer step of two accumulated micro-batches
and writes ``trainer_rank{r}.pt``: its micro-batches, the ``num_items_in_batch`` its forwards
received, the (all-reduced, under FSDP gathered) gradients before the optimizer step, the
Trainer's first log, and under FSDP what accelerate built.
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
import calplug.trainer  # noqa: E402
from calplug.trainer import enable_for_trainer  # noqa: E402


def accelerate_fsdp_on_cpu_ranks() -> None:
    """Test-only: accelerate 1.15 turns the Trainer's FSDP plugin into ``DistributedType.FSDP``
    for accelerator devices only; on CPU ranks (``MULTI_CPU``) it keeps DDP and says nothing.
    Let the CPU state take the FSDP path, so accelerate's own FSDP code wraps the model."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init


def note_prepare(noted: dict) -> None:
    """Record how accelerate distributes the model when the Trainer prepares it (later reads of
    ``accelerator.distributed_type`` can show ``PartialState``'s MULTI_CPU again)."""
    import accelerate

    original = accelerate.Accelerator.prepare

    def prepare(self, *args, **kwargs):
        noted.setdefault("distributed_type", str(self.distributed_type))
        return original(self, *args, **kwargs)

    accelerate.Accelerator.prepare = prepare


def fsdp_facts(trainer) -> dict:
    """What accelerate built: the FSDP units and what a rank holds of lm_head."""
    from torch.distributed.fsdp import FSDPModule

    w = trainer.model.get_output_embeddings().weight
    return {"wrapped": type(trainer.model_wrapped).__name__,
            "units": [n or "<root>" for n, m in trainer.model.named_modules()
                      if isinstance(m, FSDPModule)],
            "head_type": type(w).__name__, "head_numel": w.numel(),
            "head_local_numel": (w.to_local() if type(w).__name__ == "DTensor" else w).numel(),
            "enabled": calplug.is_enabled(trainer.model_wrapped)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fsdp", type=int, default=0, choices=[0, 2],
                    help="2: the Trainer's FSDP settings (FSDP2 through accelerate)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    from transformers import Trainer

    model = _common.make_model()
    collator = _hf.RecordingCollator()
    grads = _hf.GradsAtFirstStep()
    noted: dict = {}
    if args.fsdp:
        accelerate_fsdp_on_cpu_ranks()
        note_prepare(noted)
        # Llava's _no_split_modules names CLIPTextEmbeddings, which it does not contain:
        # accelerate's auto-wrap then fails unless the layer classes are named.
        fsdp = dict(fsdp="full_shard auto_wrap", fsdp_config={
            "fsdp_version": args.fsdp,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "CLIPEncoderLayer"]})
    else:
        fsdp = dict(ddp_find_unused_parameters=True)
    training_args = _hf.training_args(os.path.join(args.out, "trainer"), ddp_backend="gloo",
                                      ddp_timeout=120, **fsdp)
    if args.fsdp:
        # calplug.enable before the Trainer wraps the model (fully_shard keeps the instance's
        # forward), and the logging callback attached to the trainer.
        calplug.enable(model)
        trainer = Trainer(model=model, args=training_args, train_dataset=_hf.samples(model),
                          data_collator=collator, callbacks=[grads])
        calplug.trainer.attach(trainer)
    else:
        trainer = Trainer(model=model, args=training_args, train_dataset=_hf.samples(model),
                          data_collator=collator, callbacks=[grads])
        enable_for_trainer(trainer)
    assert calplug.is_enabled(model)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, k: seen.append(int(k["num_items_in_batch"])), with_kwargs=True)
    trainer.train()
    record = {"world_size": trainer.args.world_size, "batches": collator.batches[:2],
              "num_items_in_batch": seen, "grads": grads.grads,
              "log": trainer.state.log_history[0]}
    if args.fsdp:
        record["fsdp"] = dict(fsdp_facts(trainer), **noted)
    torch.save(record, os.path.join(args.out, f"trainer_rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
