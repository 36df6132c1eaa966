"""One rank of two-rank CAL training under PyTorch FSDP2 (``fully_shard``) and FSDP1
(``FullyShardedDataParallel``), CPU and gloo: every scenario of ``_common.FSDP_SCENARIOS`` named
on the command line, one after the other in one process group (one launch for all of them).

Launched by tests/distributed/test_fsdp.py with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set, so `torchrun` launches it too:

    torchrun --nproc_per_node 2 tests/distributed/_fsdp_worker.py --out /tmp/out fsdp2 fsdp1

Per scenario it writes ``{name}.rank{r}.pt`` (losses, gaps, what the rank saw: sharding,
agreement, memory, FSDP2 all-gathers) and, on rank 0, ``{name}.full.pt`` (every parameter's full
gradient per step and the full parameters after training; collected on every rank, as the
gathers are collectives). A scenario that expects calplug to refuse records the error instead.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import calplug  # noqa: E402
from calplug import distributed, errors, plugins  # noqa: E402
from calplug.integrations import compat  # noqa: E402

GAPS: list = []


class Recorder:
    @calplug.hookimpl
    def calplug_observe_step(self, gaps):
        GAPS.append(gaps.detach().clone())


# -- wrapping ----------------------------------------------------------------------------------
def wrap_fsdp2(model, spec, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh}
    if spec.get("bf16"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    head = model.get_output_embeddings()
    if spec["layout"] == "accelerate":
        # accelerate 1.15 fsdp2_prepare_model: every _no_split_modules class bottom-up, the input
        # embedding, lm_head (reshard_after_forward=False), then the root.
        names = set(model._no_split_modules)
        for m in reversed(list(model.modules())[1:]):
            if type(m).__name__ in names:
                fully_shard(m, **kw)
        fully_shard(model.get_input_embeddings(), **kw)
        fully_shard(head, reshard_after_forward=False, **kw)
    else:
        for m in list(model.modules()):
            if type(m).__name__ == "LlamaDecoderLayer":
                fully_shard(m, **kw)
        if spec["layout"] == "layers+head":
            fully_shard(head, **kw)  # resharded after its forward: calplug must unshard it
    fully_shard(model, **kw)
    if spec.get("unused_grads"):
        model.set_reduce_scatter_unused_params(True)
    return model


def wrap_fsdp1(model, spec):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    head = model.get_output_embeddings()
    with_head = spec["layout"] == "layers+head"
    policy = None if spec["layout"] == "root" else functools.partial(
        lambda_auto_wrap_policy,
        lambda_fn=lambda m: isinstance(m, LlamaDecoderLayer) or (with_head and m is head))
    return FullyShardedDataParallel(model, auto_wrap_policy=policy,
                                    use_orig_params=spec["use_orig_params"],
                                    device_id=torch.device("cpu"))


# -- full gradients and parameters (collectives: every rank calls them) ------------------------
def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def full_grads(engine, model, spec) -> dict:
    """Every parameter's full gradient (0 where none arrived, None for frozen ones)."""
    if spec["fsdp"] == 2:
        out = {}
        for n, p in model.named_parameters():
            g = p.grad
            if g is not None and type(g).__name__ == "DTensor":
                g = g.full_tensor()
            out[n] = None if not p.requires_grad else (
                torch.zeros(p.shape) if g is None else g.detach().float().clone())
        return out
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 without use_orig_params cannot unshard gradients (summon_full_params(with_grads)):
    # put each local gradient shard into its parameter's local shard (same layout), unshard the
    # parameters, and put the parameters back.
    saved = []
    with torch.no_grad():
        for p in engine.parameters():
            saved.append(p.detach().clone())
            p.copy_(p.grad) if p.grad is not None else p.zero_()
    with FullyShardedDataParallel.summon_full_params(engine, writeback=False):
        out = {_clean(n): p.detach().clone() if p.requires_grad else None
               for n, p in model.named_parameters()}
    with torch.no_grad():
        for p, s in zip(engine.parameters(), saved):
            p.copy_(s)
    return out


def full_params(engine, model, spec) -> dict:
    if spec["fsdp"] == 2:
        return {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone()
                for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(engine, writeback=False):
        return {_clean(n): p.detach().clone() for n, p in model.named_parameters()}


# -- what the rank holds -----------------------------------------------------------------------
def live_full_heads(shape, recorded: list) -> int:
    """Plain tensors (not DTensor shards) of the full lm_head weight's shape whose storage is
    allocated, other than the gradients this worker recorded: a full head weight alive after the
    step (an unsharded FSDP parameter is resized to 0 bytes when FSDP reshards it).

    Scanned up to three times, 0.5 s apart: a buffer of a collective still completing in gloo's
    threads when training returns is not "alive after the step" (once, in 1 of many runs, the
    first scan found one); a full head weight that FSDP or calplug keeps stays in every scan.
    What the last scan found, and what holds it, is in `FOUND`."""
    mine = {id(g) for step in recorded for g in step.values() if g is not None}
    for attempt in range(3):
        if attempt:
            time.sleep(0.5)
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
            warnings.simplefilter("ignore")
            tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        found = [t for t in tensors
                 if type(t).__name__ != "DTensor" and id(t) not in mine and tuple(t.shape) == shape
                 and t.untyped_storage().nbytes() > 0]
        FOUND[:] = [describe_tensor(t) for t in found]
        del tensors, found  # the scan itself must not keep them alive until the next one
        if not FOUND:
            return 0
    return len(FOUND)


FOUND: list[str] = []  # what the last scan found, for the test's failure message


def describe_tensor(t) -> str:
    """What a live tensor is and what holds it (the referrers' types), to explain a failure."""
    holders = [type(r).__name__ + (f"{sorted(map(str, r))[:6]}" if isinstance(r, dict) else "")
               for r in gc.get_referrers(t) if not isinstance(r, list)]
    return (f"{type(t).__name__} {tuple(t.shape)} {t.dtype} requires_grad={t.requires_grad} "
            f"grad_fn={type(t.grad_fn).__name__ if t.grad_fn is not None else None} "
            f"storage={t.untyped_storage().nbytes()} held by {holders[:8]}")


def local_tensor(p):
    return p.to_local() if type(p).__name__ == "DTensor" else p


def local_numel(p) -> int:
    return local_tensor(p).numel()


def head_facts(head) -> dict:
    """What this rank holds of lm_head.weight: its type, the elements of its local shard and the
    bytes allocated for them (0: a view whose storage FSDP freed)."""
    w = head.weight
    return {"type": type(w).__name__, "local_numel": local_numel(w),
            "storage_bytes": local_tensor(w).untyped_storage().nbytes()}


def count_fsdp2_backward_all_gathers() -> list:
    """(module path) of every FSDP2 all-gather issued in backward (FSDP2 internals: the test
    needs them to see a wasted all-gather; the pinned torch has them)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    log = []
    original = FSDPParamGroup.unshard

    def unshard(self, async_op=False):
        issues = self._all_gather_result is None and not self.is_unsharded
        original(self, async_op)
        if issues and self._all_gather_result is not None \
                and self._training_state in (TrainingState.PRE_BACKWARD, TrainingState.POST_BACKWARD):
            log.append(self._module_fqn or "<root>")

    FSDPParamGroup.unshard = unshard
    return log


# -- one scenario ------------------------------------------------------------------------------
def run(name: str, spec: dict, rank: int, mesh, bwd_gathers: list, out_dir: str) -> None:
    t0 = time.perf_counter()
    timings = []

    def lap(label):
        timings.append((label, round(time.perf_counter() - t0, 2)))

    model = _common.make_model()
    if spec.get("freeze"):
        _common.freeze_vision(model)
    shape = tuple(model.get_output_embeddings().weight.shape)
    full_numel = sum(p.numel() for p in model.parameters())
    dummy = _common.add_dummy_image_hook(model) if spec.get("dummy") else {"needed": False}
    cal = dict(contrast=spec.get("contrast", "drop"), loss_chunk=spec.get("loss_chunk", 0))
    if not spec.get("enable_after"):
        calplug.enable(model, **cal)
    if spec["fsdp"] == 2:
        engine = wrap_fsdp2(model, spec, mesh)
    else:
        engine = wrap_fsdp1(model, spec)
        assert engine.module is model
    if spec.get("enable_after"):
        calplug.enable(engine, **cal)
    assert calplug.is_enabled(model)
    lap("wrapped")
    head = model.get_output_embeddings()  # FSDP1 with a head unit: the wrapper
    decoder, _ = compat.vlm_decoder_and_head(model)
    rec = {"sharded_outside": distributed.is_sharded(model), "decoder_calls": [],
           "agree_inside": [], "bwd_all_gathers": [],
           "losses": [], "gaps": []}
    calls = [0]

    def on_decoder(module, args):
        if calls[0] == 0:
            rec["agree_inside"].append(distributed.must_agree(model))
        calls[0] += 1

    decoder.register_forward_pre_hook(on_decoder)
    # Shards really partitioned: this rank's elements over the whole model's.
    rec["local_fraction"] = sum(local_numel(p) for p in engine.parameters()) / full_numel
    rec["head_outside"] = head_facts(head)
    opt = torch.optim.SGD([p for p in engine.parameters() if p.requires_grad], lr=_common.LR)
    grads = []
    try:
        for step in range(_common.STEPS):
            batch = _common.rank_batch(model, spec["case"], rank, step)
            dummy["needed"] = batch["pixel_values"] is None
            calls[0] = 0
            del bwd_gathers[:]
            GAPS.clear()
            opt.zero_grad(set_to_none=True)
            out = engine(**batch)
            out.loss.backward()
            rec["losses"].append(float(out.loss.detach()))
            rec["gaps"].append(GAPS[-1])
            rec["decoder_calls"].append(calls[0])
            rec["bwd_all_gathers"].append(list(bwd_gathers))
            del out
            lap(f"step {step}")
            grads.append(full_grads(engine, model, spec))
            opt.step()
            lap(f"grads {step}")
    except (errors.CALConfigError, errors.CALInputError) as e:
        if not spec.get("refused"):
            raise
        rec["refused"] = (type(e).__name__, str(e))
        print(f"rank {rank}: {name}: refused: {type(e).__name__}: {e}", flush=True)
        torch.distributed.barrier()  # both ranks got here: nothing hangs
        torch.save(rec, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        return
    rec["live_full_heads"] = live_full_heads(shape, grads)
    rec["live_full_heads_found"] = list(FOUND)
    lap("scan")
    if spec.get("memory_control"):
        # Negative control of that scan: it finds a full head weight gathered on purpose.
        if spec["fsdp"] == 2:
            full_head = head.weight.full_tensor()
            rec["live_full_heads_control"] = live_full_heads(shape, grads)
            del full_head
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(engine, writeback=False):
                rec["live_full_heads_control"] = live_full_heads(shape, grads)
        lap("control")
    rec["head_after"] = head_facts(head)
    params = full_params(engine, model, spec)
    lap("params")
    rec["seconds"] = time.perf_counter() - t0
    rec["timings"] = timings
    torch.save(rec, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    if rank == 0:
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"{name}.full.pt"))
    torch.distributed.barrier()
    print(f"rank {rank}: {name}: losses {rec['losses']} in {rec['seconds']:.1f}s {timings}",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenarios", nargs="+", choices=sorted(_common.FSDP_SCENARIOS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=60.0, help="gloo collective timeout (s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo",
                                         timeout=datetime.timedelta(seconds=args.timeout))
    rank = torch.distributed.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    plugins.register(Recorder(), name="fsdp-test-recorder")
    bwd_gathers = count_fsdp2_backward_all_gathers()
    for name in args.scenarios:
        run(name, _common.FSDP_SCENARIOS[name], rank, mesh, bwd_gathers, args.out)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
