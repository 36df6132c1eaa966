"""What CAL needs to know about sharded training (DeepSpeed ZeRO-3, FSDP).

Two rules: a direct read of a partitioned weight (the ``lm_head`` rows for target logits) must
gather it first; and when a rank skips the contrast pass because its micro-batch has nothing to
contrast, every rank must agree, or the ranks gather different parameters and the collective
calls mismatch (seen as gloo "collective mismatch" or a hang).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are partitioned across ranks (ZeRO-3 or FSDP)."""
    for p in model.parameters():
        if is_zero3_param(p) or getattr(p, "_is_sharded", False) or type(p).__name__ == "DTensor":
            return True
        break
    return False


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def must_agree(model: nn.Module) -> bool:
    """True when ranks must run the same modules in the same order: a sharded model in a
    process group (ZeRO-3 / FSDP gather parameters collectively as modules run)."""
    return _dist_ready() and is_sharded(model)


def any_rank(flag: bool, model: nn.Module) -> bool:
    """``flag`` OR-ed over all ranks when the model is sharded (one tiny all-reduce), else ``flag``."""
    return any_rank_each([flag], model)[0]


def any_rank_each(flags: list[bool], model: nn.Module) -> list[bool]:
    """Each flag OR-ed over all ranks with one all-reduce when the model is sharded, else as given."""
    if not must_agree(model):
        return list(flags)
    device = next(model.parameters()).device
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Make ``module``'s own parameters readable in full (ZeRO-3 gathers them; otherwise a no-op)."""
    params = [p for p in module.parameters(recurse=False)]
    if params and any(is_zero3_param(p) for p in params):
        import deepspeed  # only reached when DeepSpeed partitioned the parameters

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def reduce_over_ranks(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` (a small CPU tensor) summed (``op="sum"``) or maxed (``"max"``) over all ranks
    of the default process group; returned unchanged when there is no group or only one rank.
    Runs on the device the backend needs (CUDA for NCCL) and comes back on the CPU."""
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return values
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = values.to(device)
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(t, op=reduce_op)
    return t.cpu()
