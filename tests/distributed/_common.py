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

    decoder, _ = compat.llava_type_decoder_and_head(model)
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
