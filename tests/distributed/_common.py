"""Shared by the distributed tests and their worker script: models, per-rank batches, reference.

Data-parallel semantics: rank ``r`` of ``world`` trains on its own micro-batch ``rank_batch(r)``;
DDP and DeepSpeed average the gradients over ranks, so one data-parallel step equals one
single-process step on ``mean_r(CAL loss of micro-batch r)``. That is the single-process reference
every distributed test compares against (CAL's weighted mean and its flat pooling are per
micro-batch, so one forward over the concatenated global batch is a different number by design).
"""
from __future__ import annotations

import torch

import calplug
from calplug.testing import llava_batch, tiny_llava

WORLD = 2
STEPS = 2
LR = 0.05
# Which samples of each rank's micro-batch carry an image, per case.
CASES = {
    "images": {0: (True, True), 1: (True, False)},
    # One rank with images, one rank text-only (no pixel_values at all on rank 1).
    "mixed": {0: (True, True), 1: (False, False)},
}


HEAD_SCALE = 40.0


def make_model(seed: int = 0):
    """The tiny Llava with its ``lm_head`` scaled up: at random init the image moves target logits
    by ~0.1, so every CAL weight would sit at ``alpha = 1`` and CAL would equal plain
    cross-entropy; scaled, the gaps span about [-5, 6] and the weights use the whole [1, 5]."""
    model = tiny_llava(seed).train()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
    return model


def rank_batch(model, case: str, rank: int, step: int) -> dict:
    return llava_batch(model, seed=1000 * step + rank, lengths=(10, 8),
                       with_image=CASES[case][rank])


def add_dummy_image_hook(model):
    """What the LLaVA codebases do for a text-only micro-batch: run the vision tower on a dummy
    image and add its features times 0, so every rank runs (and, under ZeRO-3, gathers) the same
    modules in the same order and every parameter gets a gradient. Only on grad-enabled calls
    without pixels (the main pass); the state flag is set per step by the caller."""
    from calplug.integrations import compat

    decoder, _ = compat.vlm_decoder_and_head(model)
    state = {"needed": False}
    vc = model.config.vision_config

    def pre_hook(module, args, kwargs):
        if not (state["needed"] and torch.is_grad_enabled()):
            return None
        dummy = torch.zeros(1, 3, vc.image_size, vc.image_size)
        feats = model.model.get_image_features(
            pixel_values=dummy, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        feats = torch.cat(list(feats.pooler_output))
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + 0.0 * feats.sum()
        return args, kwargs

    decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return state


def reference_run(case: str, steps: int = STEPS, lr: float = LR, contrast: str = "drop"):
    """Single process, same model init and micro-batches: per step and rank the CAL loss and gap,
    and the parameters after ``steps`` SGD steps on the mean of the ranks' losses."""
    model = make_model()
    calplug.enable(model, contrast=contrast)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, deltas = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        step_losses, step_deltas = [], []
        for rank in range(WORLD):
            out = model(**rank_batch(model, case, rank, step))
            (out.loss / WORLD).backward()
            step_losses.append(float(out.loss.detach()))
            step_deltas.append(out.cal_gaps.clone())
        opt.step()
        losses.append(step_losses)
        deltas.append(step_deltas)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, deltas, params


def freeze_vision(model):
    """LLaVA's fine-tuning stage: vision tower and projector frozen (no gradients at all)."""
    for module in (model.model.vision_tower, model.model.multi_modal_projector):
        module.requires_grad_(False)
    return model


def _zero_filled(model, grads: dict) -> dict:
    """Every parameter's gradient, 0 where none arrived (a parameter no rank used, e.g. the CLIP
    layer vision_feature_layer=-2 skips), None for frozen ones: how the FSDP runs report them."""
    return {n: (grads[n] if n in grads else torch.zeros_like(p)) if p.requires_grad else None
            for n, p in model.named_parameters()}


def reference_steps(case: str, contrast: str = "drop", freeze: bool = False,
                    param_dtype: torch.dtype | None = None) -> dict:
    """Single process, the same model init and micro-batches as the ranks: per step the CAL loss
    and gaps of each rank's micro-batch and the gradient of ``mean_r loss_r``, then the
    parameters after ``STEPS`` SGD steps (as {losses, gaps, grads, params}).

    ``param_dtype=torch.bfloat16`` emulates FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``: float32 master parameters; per micro-batch a copy whose parameters (not
    buffers: FSDP casts parameters only) are cast to bf16 runs forward and backward on bf16
    inputs (``cast_forward_inputs``), and its gradients are upcast and averaged in float32."""
    import copy

    master = make_model()
    if freeze:
        freeze_vision(master)
    if param_dtype is None:
        calplug.enable(master, contrast=contrast)
    seen = []

    class Recorder:
        @calplug.hookimpl
        def calplug_observe_step(self, gaps):
            seen.append(gaps.clone())

    from calplug import plugins

    name = f"reference-recorder-{id(seen):x}"
    plugins.register(Recorder(), name=name)
    record = {"losses": [], "gaps": [], "grads": []}
    opt = torch.optim.SGD([p for p in master.parameters() if p.requires_grad], lr=LR)
    try:
        for step in range(STEPS):
            grads: dict = {}
            losses = []
            for rank in range(WORLD):
                batch = rank_batch(master, case, rank, step)
                model = master
                if param_dtype is not None:
                    model = copy.deepcopy(master)
                    for p in model.parameters():
                        p.data = p.data.to(param_dtype)
                    calplug.enable(model, contrast=contrast)
                    if batch["pixel_values"] is not None:
                        batch["pixel_values"] = batch["pixel_values"].to(param_dtype)
                out = model(**batch)
                (out.loss / WORLD).backward()
                losses.append(float(out.loss.detach()))
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        g = p.grad.detach().float().clone()
                        grads[n] = grads[n] + g if n in grads else g
                        p.grad = None
            record["losses"].append(losses)
            record["gaps"].append(seen[-WORLD:])
            record["grads"].append(_zero_filled(master, grads))
            for n, p in master.named_parameters():
                p.grad = grads.get(n)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        plugins.unregister(name=name)
    record["params"] = {n: p.detach().clone() for n, p in master.named_parameters()}
    return record


# The FSDP runs of tests/distributed/_fsdp_worker.py, all in one two-rank launch. Keys:
# fsdp (2: fully_shard, 1: FullyShardedDataParallel); layout ("layers": every LlamaDecoderLayer
# a unit plus the root, as transformers / accelerate auto-wrap a decoder; "layers+head": lm_head
# a unit of its own too, resharded after its forward; "accelerate": accelerate 1.15's
# fsdp2_prepare_model layout for Llava, _no_split_modules units incl. the CLIP layers, the input
# embedding, lm_head kept unsharded after forward, the root; "root": FSDP1 without auto-wrap
# policy, one unit); case; contrast; freeze (vision tower
# and projector frozen); dummy (text-only micro-batches run a dummy image); unused_grads
# (FSDP2 set_reduce_scatter_unused_params); use_orig_params (FSDP1); bf16 (MixedPrecisionPolicy
# bf16 parameters, fp32 reduce); enable_after (calplug.enable on the wrapped model);
# loss_chunk; refused (the calplug error both ranks must raise instead of training);
# memory_control (also run the negative control of the live-full-head scan).
FSDP_SCENARIOS = {
    "fsdp2": dict(fsdp=2, layout="layers", case="mixed", freeze=True, memory_control=True),
    "fsdp2-head-unit": dict(fsdp=2, layout="layers+head", case="mixed", unused_grads=True,
                            enable_after=True),
    "fsdp2-accelerate": dict(fsdp=2, layout="accelerate", case="mixed", dummy=True),
    "fsdp2-accelerate-blur": dict(fsdp=2, layout="accelerate", case="images", contrast="blur"),
    "fsdp2-bf16": dict(fsdp=2, layout="layers", case="mixed", freeze=True, bf16=True),
    "fsdp1": dict(fsdp=1, layout="layers", case="mixed", use_orig_params=False, enable_after=True,
                  memory_control=True),
    "fsdp1-orig-head-unit": dict(fsdp=1, layout="layers+head", case="mixed", freeze=True,
                                 use_orig_params=True),
    "fsdp2-blur-text-only": dict(fsdp=2, layout="accelerate", case="mixed", dummy=True,
                                 contrast="blur", refused="CALInputError"),
    "fsdp2-loss-chunk": dict(fsdp=2, layout="layers", case="mixed", freeze=True, loss_chunk=4,
                             refused="CALConfigError"),
    "fsdp1-root-only-loss-chunk": dict(fsdp=1, layout="root", case="mixed", use_orig_params=True,
                                       loss_chunk=4, refused="CALConfigError"),
}
