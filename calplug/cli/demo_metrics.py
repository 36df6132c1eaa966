"""What ``calplug demo`` measures: on clean held-out captions, the mean log-probability of the
true visual word (teacher-forced, the primary metric) and greedy visual-word accuracy (the
secondary one), per attribute and per image; and, during the CAL runs of stage 2, what CAL did to
the weights (gap, clamped and pooled weight of true, wrong and filler words). docs/demo.md
defines each number.
"""
from __future__ import annotations

import torch

from . import synthetic
from .demo_protocol import Protocol


# -- what CAL did to the weights ------------------------------------------------------------------
WEIGHT_GROUPS = ("true", "wrong", "filler")


def new_weight_stats() -> dict:
    z = dict(n=0, gap=0.0, clamped=0.0, pooled=0.0)
    return dict(groups={g: dict(z) for g in WEIGHT_GROUPS},
                attributes={a: dict(z) for a in synthetic.ATTRIBUTES},
                total_weight=0.0, tokens=0)


@torch.no_grad()
def add_weight_stats(stats: dict, gaps: torch.Tensor, weights: torch.Tensor, corrupted: torch.Tensor) -> None:
    """Sums, over one step, of the gap, the clamped weight and the pooled (final) weight of the
    visual words of clean captions ("true"), of corrupted captions ("wrong"), and of the filler
    words; per attribute (true words only) and the summed weight of every supervised token."""
    from ..config import CALConfig

    cfg = CALConfig()
    row = lambda slot: synthetic.PROMPT_LENGTH + slot - 1  # the row whose logits predict caption word ``slot``
    gaps, weights = gaps.float(), weights.float()
    clamped = gaps.clamp(cfg.alpha, cfg.beta)
    rows = slice(row(0), row(synthetic.CAPTION_LENGTH))
    stats["total_weight"] += float(weights[:, rows].sum())
    stats["tokens"] += weights[:, rows].numel()

    def add(entry, sel, col):
        entry["n"] += int(sel.sum())
        entry["gap"] += float(gaps[sel, col].sum())
        entry["clamped"] += float(clamped[sel, col].sum())
        entry["pooled"] += float(weights[sel, col].sum())

    for a, slot in synthetic.VISUAL_SLOTS.items():
        add(stats["groups"]["true"], ~corrupted, row(slot))
        add(stats["groups"]["wrong"], corrupted, row(slot))
        add(stats["attributes"][a], ~corrupted, row(slot))
    for slot in synthetic.FILLER_SLOTS:
        add(stats["groups"]["filler"], torch.ones_like(corrupted), row(slot))


def weight_summary(stats: dict) -> dict:
    """Means of the sums ``add_weight_stats`` kept; each attribute's share of the summed weight
    (per token of that attribute in a caption; plain cross-entropy gives each token 1/14)."""
    def mean(e):
        return {k: (e[k] / e["n"] if e["n"] else None) for k in ("gap", "clamped", "pooled")} | {"n": e["n"]}

    per_token = stats["total_weight"] / stats["tokens"] if stats["tokens"] else None
    return dict(groups={g: mean(e) for g, e in stats["groups"].items()},
                attributes={a: mean(e) for a, e in stats["attributes"].items()},
                mean_weight=per_token,
                share={a: (e["pooled"] / e["n"]) / (per_token * synthetic.CAPTION_LENGTH)
                       if e["n"] and per_token else None for a, e in stats["attributes"].items()})


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def true_word_logprobs(model, data: synthetic.CaptionSet, vocab: synthetic.Vocab, chunk: int = 256) -> torch.Tensor:
    """``[N, 4]``: log p(true visual word | prompt with the image, clean caption before it), for
    each image of ``data`` (whose captions must be clean) and each attribute in
    ``synthetic.ATTRIBUTES`` order."""
    if bool(data.corrupted.any()):
        raise ValueError("true_word_logprobs needs clean captions")
    was = model.training
    model.eval()
    rows = torch.tensor([synthetic.PROMPT_LENGTH + slot - 1 for slot in synthetic.VISUAL_SLOTS.values()])
    out = []
    for start in range(0, len(data), chunk):
        b = synthetic.batch(data, list(range(start, min(start + chunk, len(data)))), vocab)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits[:, rows].float()
        targets = b["input_ids"][:, rows + 1]
        out.append(logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1))
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def greedy(model, pixel_values: torch.Tensor, vocab: synthetic.Vocab, max_new: int = 14,
           chunk: int = 256) -> torch.Tensor:
    """Greedy decoding (arg max at every step) from ``<bos> <image> describe :``; ``[N, max_new]``.
    One pass over the prompt with the image, then one token at a time from the key/value cache."""
    import inspect

    # transformers 5 calls the key/value cache `cache`, earlier releases `past_key_values`
    cache = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    was = model.training
    model.eval()
    outs = []
    for start in range(0, pixel_values.shape[0], chunk):
        px = pixel_values[start:start + chunk]
        ids = torch.tensor([synthetic.prompt_ids(vocab)] * px.shape[0])
        mask = torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
        new = []
        for k in range(max_new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(nxt)
            if k + 1 == max_new:
                break
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache: getattr(out, cache)})
        outs.append(torch.cat(new, dim=1))
    model.train(was)
    return torch.cat(outs)


def correct_words(generated: torch.Tensor, data: synthetic.CaptionSet, vocab: synthetic.Vocab) -> torch.Tensor:
    """``[N, 4]`` bool: is the first generated word of each attribute the true one (no word of
    the attribute counts as wrong)."""
    rows = []
    for ids, scene in zip(generated.tolist(), data.scenes):
        words = vocab.decode(ids)
        rows.append([next((w for w in words if w in values), None) == getattr(scene, a)
                     for a, values in synthetic.ATTRIBUTES.items()])
    return torch.tensor(rows, dtype=torch.bool)


def score(generated: torch.Tensor, data: synthetic.CaptionSet, vocab: synthetic.Vocab) -> dict:
    """Per attribute and overall: share of images whose first generated word of that attribute is
    the true one."""
    return per_attribute(correct_words(generated, data, vocab).float())


def per_attribute(values: torch.Tensor) -> dict:
    """Means of an ``[N, 4]`` table per attribute and overall."""
    result = {a: float(values[:, i].mean()) for i, a in enumerate(synthetic.ATTRIBUTES)}
    result["all"] = float(values.mean())
    return result


def evaluate(model, evalset: synthetic.CaptionSet, vocab: synthetic.Vocab, proto: Protocol) -> dict:
    """Both metrics per attribute and overall, and each image's overall score (for paired
    per-image differences)."""
    logprob = true_word_logprobs(model, evalset, vocab)
    correct = correct_words(greedy(model, evalset.pixel_values, vocab, proto.greedy_tokens), evalset, vocab).float()
    return dict(logprob=per_attribute(logprob), accuracy=per_attribute(correct),
                per_image=dict(logprob=logprob.mean(1), accuracy=correct.mean(1)))
