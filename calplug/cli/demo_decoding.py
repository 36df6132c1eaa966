"""``calplug demo --decoding``: does contrastive decoding help in the demo's world?

Every stage-2 model of the run (plain and CAL, every condition and seed) answers the same clean
held-out images twice: greedy ``generate()`` and `calplug.contrastive_generate` (the default
``drop`` contrast, VCD's ``cd_alpha = 1``, ``cd_beta = 0.1``). The metric is the demo's greedy
visual-word accuracy (the first generated word of each attribute is the true one;
`demo_metrics.correct_words`). The difference contrastive - greedy is paired by seed (the same
model, the same images) and judged like the demo's own verdicts (`demo_verdicts.verdict`: Student's
t over seeds, at least 1.96 evaluation standard errors from the per-image differences).
docs/decoding.md quotes the table.
"""
from __future__ import annotations

import statistics

import torch

from . import demo_metrics, synthetic
from .demo_protocol import METHOD_LABELS, METHODS

CD_ALPHA, CD_BETA, CONTRAST = 1.0, 0.1, "drop"


@torch.no_grad()
def answers(model, pixel_values: torch.Tensor, vocab: synthetic.Vocab, max_new: int, contrastive: bool,
            chunk: int = 256) -> torch.Tensor:
    """``[N, max_new]`` generated ids after ``<bos> <image> describe :`` (greedy, or contrastive)."""
    import calplug

    was = model.training
    model.eval()
    outs = []
    for start in range(0, pixel_values.shape[0], chunk):
        px = pixel_values[start:start + chunk]
        ids = torch.tensor([synthetic.prompt_ids(vocab)] * px.shape[0])
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                      max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=vocab.pad)
        if contrastive:
            out = calplug.contrastive_generate(model, cd_alpha=CD_ALPHA, cd_beta=CD_BETA,
                                               contrast=CONTRAST, **inputs)
        else:
            out = model.generate(**inputs, do_sample=False)
        outs.append(out[:, ids.shape[1]:])
    model.train(was)
    return torch.cat(outs)


def evaluate(model, evalset: synthetic.CaptionSet, vocab: synthetic.Vocab, proto) -> dict:
    """Visual-word accuracy per attribute and per image, greedy and contrastive, and the
    per-image differences."""
    found = {}
    for name, contrastive in (("greedy", False), ("contrastive", True)):
        ids = answers(model, evalset.pixel_values, vocab, proto.greedy_tokens, contrastive)
        correct = demo_metrics.correct_words(ids, evalset, vocab).float()
        found[name] = dict(accuracy=demo_metrics.per_attribute(correct), per_image=correct.mean(1))
    diff = found["contrastive"]["per_image"] - found["greedy"]["per_image"]
    return dict(greedy=found["greedy"]["accuracy"], contrastive=found["contrastive"]["accuracy"],
                image_differences=dict(n=int(diff.numel()), mean=float(diff.mean()),
                                       sd=float(diff.std()) if diff.numel() > 1 else 0.0))


def paired_rows(result: dict) -> list[dict]:
    """One row per condition and method: mean greedy and contrastive accuracy over seeds, the
    paired difference, its SE, margin and verdict."""
    from .demo_verdicts import verdict

    proto = result["protocol"]
    seeds = [str(s) for s in proto["seeds"]]
    rows = []
    for cond in proto["conditions"]:
        for method in METHODS:
            runs = [result["stage2"][cond["key"]][s][method]["decoding"] for s in seeds]
            greedy = [r["greedy"]["all"] for r in runs]
            contrastive = [r["contrastive"]["all"] for r in runs]
            v = verdict([c - g for c, g in zip(contrastive, greedy)], [r["image_differences"] for r in runs])
            v["verdict"] = v["verdict"].replace("CAL", "contrastive")
            per_attribute = {a: statistics.fmean(r["contrastive"][a] - r["greedy"][a] for r in runs)
                             for a in synthetic.ATTRIBUTES}
            rows.append(dict(condition=cond["key"], label=cond["label"], method=method,
                             greedy=statistics.fmean(greedy), contrastive=statistics.fmean(contrastive),
                             per_seed=[c - g for c, g in zip(contrastive, greedy)],
                             attributes=per_attribute, **v))
    return rows


def table(result: dict, rows: list[dict]) -> str:
    proto = result["protocol"]
    n = len(proto["seeds"])
    lines = ["contrastive decoding in the demo's world: greedy visual-word accuracy of each stage-2 model,",
             f"generate() vs calplug.contrastive_generate (contrast={CONTRAST}, cd_alpha={CD_ALPHA:g}, "
             f"cd_beta={CD_BETA:g}); {n} seed{'s' * (n > 1)},",
             f"the same {proto['eval_size']} clean held-out images per seed; contrastive-greedy paired by seed",
             f"{'condition':<16}{'model':<7}{'greedy':>8}{'contrastive':>13}{'contr.-greedy':>15}{'SE':>7}  verdict"]
    for r in rows:
        lines.append(f"{r['label']:<16}{METHOD_LABELS[r['method']]:<7}{r['greedy']:>8.3f}{r['contrastive']:>13.3f}"
                     f"{r['difference']:>+15.3f}{r['se']:>7.3f}  {r['verdict']} (margin {r['margin']:.3f})")
    lines += ["", "contrastive-greedy per attribute, mean over seeds",
              f"{'condition':<16}{'model':<7}" + "".join(f"{a:>10}" for a in synthetic.ATTRIBUTES)]
    for r in rows:
        lines.append(f"{r['label']:<16}{METHOD_LABELS[r['method']]:<7}"
                     + "".join(f"{r['attributes'][a]:>+10.3f}" for a in synthetic.ATTRIBUTES))
    return "\n".join(lines)
