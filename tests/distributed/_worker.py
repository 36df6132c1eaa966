"""One rank of a two-rank CAL training run (DDP, DeepSpeed ZeRO-2 or ZeRO-3), CPU and gloo.

Launched by tests/distributed/test_data_parallel.py with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set (so `torchrun` or `deepspeed --num_gpus 2` can launch it too):

    python tests/distributed/_worker.py --mode zero3 --case mixed --out /tmp/out

Writes ``rank{r}.pt`` (losses, gaps, partitioning facts) and, on rank 0, the full parameters after
training (gathered under ZeRO-3). Under DDP, ``--case images,mixed`` trains each case in turn (a
fresh model each, one process group), writing into ``<out>/<case>/``: one launch for both.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import calplug  # noqa: E402
from calplug import distributed, plugins  # noqa: E402


def deepspeed_config(stage: int, release_all: bool) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter, however small (the tiny model's would all stay whole otherwise).
        zero.update(stage3_param_persistence_threshold=0)
        if release_all:
            # No prefetching, and every gathered parameter released right after its module.
            zero.update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                        stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "zero2", "zero3"], required=True)
    ap.add_argument("--case", required=True,
                    help=f"one of {sorted(_common.CASES)}; under ddp several, comma-separated")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-agree", action="store_true",
                    help="negative control: ranks decide alone whether to run the contrast pass")
    ap.add_argument("--contrast", default="drop", help="CALConfig.contrast for both ranks")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = ap.parse_args()
    cases = args.case.split(",")
    if any(case not in _common.CASES for case in cases) or (len(cases) > 1 and args.mode != "ddp"):
        ap.error(f"--case {args.case}: give one of {sorted(_common.CASES)} (several only with --mode ddp)")
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.no_agree:
        distributed.any_rank = lambda flag, model: flag
    if args.mode == "ddp":
        torch.distributed.init_process_group("gloo", timeout=timeout)
    for case in cases:
        folder = args.out if len(cases) == 1 else os.path.join(args.out, case)
        os.makedirs(folder, exist_ok=True)
        train(args, case, rank, timeout, folder)
    torch.distributed.destroy_process_group()
    return 0


def train(args, case: str, rank: int, timeout, folder: str) -> None:
    model = _common.make_model()
    dummy = _common.add_dummy_image_hook(model)
    # Both orders work; the "images" case enables on the bare model before wrapping it (and runs
    # ZeRO-3 without prefetching), the "mixed" case on the wrapper afterwards (ZeRO-3's default
    # prefetching and live-parameter limits).
    enable_first = case == "images"
    if enable_first:
        calplug.enable(model, contrast=args.contrast)
    if args.mode == "ddp":
        # The tiny Llava selects vision_feature_layer=-2: the last CLIP layer gets no gradient.
        engine = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=_common.LR)
    else:
        import _ds_op
        import deepspeed

        # DeepSpeed's CPU comm op as tox's commands_pre built it into the cache, else JIT-built here
        print(f"DeepSpeed's CPU comm op: {_ds_op.preload() or 'JIT load'}", flush=True)
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
        opt = torch.optim.SGD(model.parameters(), lr=_common.LR)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                 config=deepspeed_config(int(args.mode[-1]),
                                                                         release_all=enable_first))
    if not enable_first:
        calplug.enable(engine, contrast=args.contrast)  # finds the model through the DDP / DeepSpeed wrapper
    assert calplug.is_enabled(model)
    record = {"losses": [], "deltas": [], "sharded": distributed.is_sharded(model)}

    class Recorder:  # through the observer hook: DDP rebuilds outputs and drops `cal_gaps`
        @calplug.hookimpl
        def calplug_observe_step(self, gaps):
            record["deltas"].append(gaps.clone())

    recorder = Recorder()
    plugins.register(recorder, name="test-recorder")
    params = list(model.parameters())
    head = model.get_output_embeddings()
    for step in range(_common.STEPS):
        if args.mode == "zero3":
            # Outside forward, every parameter's local copy is empty; its shard is a fraction.
            record.setdefault("empty_outside_forward", []).append(
                all(p.data.numel() == 0 for p in params))
            record.setdefault("shard_fraction", []).append(
                sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params))
        batch = _common.rank_batch(model, case, rank, step)
        dummy["needed"] = batch["pixel_values"] is None
        out = engine(**batch)
        if args.mode == "ddp":
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        else:
            engine.backward(out.loss)
            engine.step()
        record["losses"].append(float(out.loss.detach()))
    if args.mode == "zero3":
        record["head_shape_outside"] = tuple(head.weight.shape)
        with distributed.gathered(head):
            record["head_shape_gathered"] = tuple(head.weight.shape)
    torch.save(record, os.path.join(folder, f"rank{rank}.pt"))
    if args.mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(full, os.path.join(folder, "params.pt"))
    plugins.unregister(recorder)
    torch.distributed.barrier()


if __name__ == "__main__":
    sys.exit(main())
