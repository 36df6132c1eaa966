"""What CAL needs to know about sharded training (DeepSpeed ZeRO-3, FSDP2, FSDP1).

Two rules: a direct read of a partitioned weight (the ``lm_head`` rows for target logits) must
gather it first; and when a rank skips the contrast pass because its micro-batch has nothing to
contrast, every rank must agree, or the ranks gather different parameters and the collective
calls mismatch (seen as gloo "collective mismatch" or a hang).

calplug asks both questions inside the root module's forward (the CAL step *is* that forward).
There FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel``) have already swapped every
parameter the root owns for a plain full tensor, so FSDP is recognised by its module types, not
by looking at a parameter.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .classes import is_named


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _fsdp2_module_class():
    """``torch.distributed.fsdp.FSDPModule`` (the class ``fully_shard`` mixes into a module), or
    None where torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def is_fsdp1_unit(module: nn.Module) -> bool:
    """An FSDP1 ``FullyShardedDataParallel`` wrapper."""
    return is_named(module, ("FullyShardedDataParallel",))


def is_fsdp2_unit(module: nn.Module) -> bool:
    """A module ``fully_shard`` was applied to (FSDP2 changes its class in place)."""
    cls = _fsdp2_module_class()
    return cls is not None and isinstance(module, cls)


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` or a submodule is an FSDP2 or FSDP1 unit, or FSDP manages ``model``
    without a unit inside it (``model`` is what an FSDP1 wrapper without auto-wrap policy wraps:
    torch marks every module FSDP manages with ``_is_fsdp_managed_module``, and without
    ``use_orig_params`` ``model`` holds the flat parameter)."""
    if any(is_fsdp2_unit(m) or is_fsdp1_unit(m) for m in model.modules()):
        return True
    if getattr(model, "_is_fsdp_managed_module", False) is True:
        return True
    return any(getattr(p, "_is_flat_param", False) for p in model.parameters(recurse=False))


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are partitioned across ranks (ZeRO-3, FSDP2 or FSDP1), inside the
    forward as well as outside it."""
    for p in model.parameters():
        if is_zero3_param(p) or getattr(p, "_is_sharded", False) or type(p).__name__ == "DTensor":
            return True
        break
    return is_fsdp(model)


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
    """Make ``module``'s own parameters readable in full for a read inside the root's forward,
    and partitioned again afterwards (no full copy outlives the block).

    * ZeRO-3: ``deepspeed.zero.GatheredParameters`` (read-only).
    * FSDP1, ``module`` a ``FullyShardedDataParallel`` unit of its own (idle after its forward):
      ``summon_full_params(module, recurse=False, writeback=False)``.
    * FSDP2, ``module`` a ``fully_shard`` unit of its own that resharded after its forward (its
      parameters are DTensors again): ``module.unshard()`` (in the mixed-precision
      ``param_dtype``, as its forward saw it), then ``module.reshard()``. A unit kept unsharded
      after forward (accelerate's ``lm_head``) is already full: nothing to do.
    * Parameters an FSDP root owns are full inside the root's forward: nothing to do.
    A module whose parameters are still DTensor shards without being a unit calplug could
    unshard raises instead of being read.
    """
    params = [p for p in module.parameters(recurse=False)]
    if params and any(is_zero3_param(p) for p in params):
        import deepspeed  # only reached when DeepSpeed partitioned the parameters

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    elif is_fsdp1_unit(module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            yield
    elif any(type(p).__name__ == "DTensor" for p in params):
        if not is_fsdp2_unit(module):
            raise RuntimeError(
                f"calplug would read {type(module).__name__}'s weight while it is an FSDP2 shard "
                "(DTensor) that calplug cannot unshard: the module is not an FSDP unit of its own. "
                "Apply fully_shard to it (or leave it to the root unit), as transformers and "
                "accelerate do")
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield


@contextlib.contextmanager
def contrast_region(model: nn.Module) -> Iterator[None]:
    """Around calplug's no-grad contrast pass: FSDP2 records every unit's forward, no-grad ones
    included, in the order its backward prefetches from, so after the contrast pass backward
    would all-gather a unit it has already finished with and hold it to the end of backward (one
    wasted all-gather per step; results are the same). On exit the records the block added are
    dropped. This uses FSDP2 internals (``comm_ctx.post_forward_order``, each parameter group's
    ``_post_forward_indices``); where they are missing it does nothing. FSDP1 and ZeRO-3 need
    nothing."""
    groups = []
    for m in model.modules():
        if is_fsdp2_unit(m) and hasattr(m, "_get_fsdp_state"):
            groups.extend(getattr(m._get_fsdp_state(), "_fsdp_param_groups", None) or [])
    groups = [g for g in groups if isinstance(getattr(g, "_post_forward_indices", None), list)
              and isinstance(getattr(getattr(g, "comm_ctx", None), "post_forward_order", None), list)]
    if not groups:
        yield
        return
    orders = {id(g.comm_ctx.post_forward_order): g.comm_ctx.post_forward_order for g in groups}
    lengths = {k: len(v) for k, v in orders.items()}
    indices = [(g._post_forward_indices, len(g._post_forward_indices)) for g in groups]
    try:
        yield
    finally:
        for kept, n in indices:
            del kept[n:]
        for k, order in orders.items():
            del order[lengths[k]:]


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
