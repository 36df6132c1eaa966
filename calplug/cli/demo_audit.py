"""``calplug demo --audit``: the audit (`calplug.audit`, docs/audit.md) on the demo's world. Two
questions, fixed before any training run was made (the one-word condition and the filter rule
after a first look at one seed's scores at 40 % noise):

1. **Does the score rank the contradicting captions lowest?** Each seed's stage-1 model (the
   demo's, from its cache) audits that seed's stage-2 training sets (6400 fresh images) at 20,
   40 and 60 % random noise, 40 % systematic noise, and 40 % "one-word" noise (a single visual
   word replaced, the rest of the caption true: a contradiction the mean over 14 tokens dilutes).
   Per signal (mean and lowest token gain, mean and lowest raw logit gap, CAL's mean weight): the
   AUROC of ranking the corrupted captions below the clean ones, mean over seeds.
2. **Does training on what it keeps help?** At 40 % random and 40 % systematic noise, per seed
   from the same stage-1 weights: plain and CAL training on all the data (the demo's runs) and on
   the audit-filtered data (the samples scoring >= 0: the image does not lower their answer on
   average; no knowledge of the noise rate). Each set is seen once (the filtered set therefore in
   fewer steps of the same batch size). Metric: the demo's primary one, the mean log-probability
   of the true visual word on clean held-out captions; each method paired with plain training on
   all data by seed (`demo_verdicts.verdict`).

It also writes the first seed's audit world for the command itself: the stage-1 model saved with
a processor (`calplug.testing.tiny_llava_processor`: the demo's words, its chat template writes
the demo's sequence), the 40 % set's images and a LLaVA JSON (``train.json``; which captions
contradict their image is in ``truth.json``), so that ``calplug audit`` can be run on it.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from .. import auditing
from . import demo_training, demo_verdicts, synthetic
from .demo_metrics import true_word_logprobs
from .demo_protocol import EVAL_STREAM, STAGE2_STREAM, Condition, Protocol

AUROC_CONDITIONS = (Condition(0.2), Condition(0.4), Condition(0.6), Condition(0.4, "systematic"),
                    Condition(0.4, "one-word"))
TRAIN_CONDITIONS = (Condition(0.4), Condition(0.4, "systematic"))
SIGNALS = {"mean_gain": "mean gain", "min_gain": "lowest gain", "mean_gap": "mean gap",
           "min_gap": "lowest gap", "weight": "CAL weight"}
METHODS = {"plain": "plain, all", "plain_filtered": "plain, filtered", "cal": "CAL, all",
           "cal_filtered": "CAL, filtered"}
# the paired differences reported: (method, minus this one)
PAIRS = (("plain_filtered", "plain"), ("cal", "plain"), ("cal_filtered", "plain"), ("cal_filtered", "plain_filtered"))
MIN_SCORE = 0.0   # the filter: keep the samples whose score (mean gain) is >= 0


def training_set(seed: int, cond: Condition, proto: Protocol):
    """A stage-2 training set (the demo's own for random and systematic noise) and, for one-word
    noise, the attribute replaced in each corrupted caption (None elsewhere)."""
    if cond.kind != "one-word":
        data, _ = demo_training.stage2_data(seed, cond, proto)
        return data, None
    data, _ = demo_training.stage2_data(seed, Condition(cond.noise), proto)   # which samples, images
    clean, _ = demo_training.stage2_data(seed, Condition(0.0), proto)
    changed = [None] * len(data)
    for i in torch.nonzero(data.corrupted).squeeze(1).tolist():
        rng = random.Random(f"one-word-{seed}-{i}")
        attribute = rng.choice(list(synthetic.VISUAL_SLOTS))
        caption = list(clean.captions[i])
        slot = synthetic.VISUAL_SLOTS[attribute]
        caption[slot] = rng.choice([v for v in synthetic.ATTRIBUTES[attribute] if v != caption[slot]])
        data.captions[i], changed[i] = caption, attribute
    return data, changed


def score_sets(model, sets: dict, vocab: synthetic.Vocab, batch_size: int = 256) -> dict:
    """`calplug.audit` records of every set (``{key: CaptionSet}``, all from one seed's images),
    each distinct (image, caption) pair scored once: the sets share their images and most captions."""
    pairs, where = {}, {}
    for key, data in sets.items():
        for i, caption in enumerate(data.captions):
            where[key, i] = pairs.setdefault((i, tuple(caption)), len(pairs))
    order = list(pairs)
    source = next(iter(sets.values()))
    merged = synthetic.CaptionSet(source.pixel_values[torch.tensor([i for i, _ in order])], [None] * len(order),
                                  [list(c) for _, c in order], torch.zeros(len(order), dtype=torch.bool), [])
    batches = (synthetic.batch(merged, list(range(s, min(s + batch_size, len(order)))), vocab)
               for s in range(0, len(order), batch_size))
    records = list(auditing.audit(model, batches))
    return {key: [dict(records[where[key, i]], index=i) for i in range(len(data))] for key, data in sets.items()}


def auroc(values, bad) -> float:
    """P(a corrupted sample's value < a clean one's) + half the ties: 1 = every corrupted caption
    ranks below every clean one, 0.5 = chance."""
    v, b = torch.tensor(values, dtype=torch.float64), torch.as_tensor(bad, dtype=torch.bool)
    clean, noisy = torch.sort(v[~b]).values, v[b]
    if not len(clean) or not len(noisy):
        return float("nan")
    above = len(clean) - torch.searchsorted(clean, noisy, right=True)
    equal = torch.searchsorted(clean, noisy, right=True) - torch.searchsorted(clean, noisy, right=False)
    return float((above + 0.5 * equal).sum() / (len(noisy) * len(clean)))


def subset(data: synthetic.CaptionSet, keep: list[int]) -> synthetic.CaptionSet:
    index = torch.tensor(keep, dtype=torch.long)
    return synthetic.CaptionSet(data.pixel_values[index], [data.scenes[i] for i in keep],
                                [data.captions[i] for i in keep], data.corrupted[index], [data.images[i] for i in keep])


def run_experiment(proto: Protocol, *, cache: Path | None, threads: int, say=print,
                   auroc_conditions=AUROC_CONDITIONS, train_conditions=TRAIN_CONDITIONS) -> dict:
    vocab = synthetic.Vocab()
    folder = demo_training.usable_cache(cache, proto, threads)
    result = dict(protocol=proto.to_dict(), min_score=MIN_SCORE, stage1={}, auroc={}, filter={}, training={},
                  conditions={c.key: c.label for c in (*auroc_conditions, *train_conditions)})
    t0 = time.perf_counter()
    for seed in proto.seeds:
        state = demo_training.load_stage1(folder, seed)
        if state is None:
            say(f"seed {seed}: training stage 1 ({proto.stage1_steps} steps)")
            state = demo_training.run_stage1(seed, vocab, proto)
            demo_training.save_stage1(folder, seed, state)
        model = demo_training.build_model(seed, vocab, proto)
        model.load_state_dict(state)
        built = {c.key: training_set(seed, c, proto) for c in {*auroc_conditions, *train_conditions}}
        t = time.perf_counter()
        scores = score_sets(model, {k: d for k, (d, _) in built.items()}, vocab)
        distinct = len({(i, tuple(c)) for d, _ in built.values() for i, c in enumerate(d.captions)})
        say(f"seed {seed}: audited {sum(len(d) for d, _ in built.values())} samples of {len(built)} sets "
            f"({distinct} distinct) in {time.perf_counter() - t:.0f} s")
        for cond in auroc_conditions:
            data, changed = built[cond.key]
            recs, bad = scores[cond.key], data.corrupted.tolist()
            found = {s: auroc([r[s] for r in recs], bad) for s in SIGNALS}
            if changed is not None:  # one-word noise: per attribute replaced, clean captions against them
                for a in synthetic.ATTRIBUTES:
                    rows = [i for i, c in enumerate(changed) if c in (None, a)]
                    found[a] = {s: auroc([recs[i][s] for i in rows], [changed[i] == a for i in rows])
                                for s in ("mean_gain", "min_gain")}
            result["auroc"].setdefault(cond.key, {})[str(seed)] = found
        evalset = synthetic.make_set(proto.eval_size, seed=EVAL_STREAM + seed, noise=0.0)
        result["stage1"][str(seed)] = float(true_word_logprobs(model, evalset, vocab).mean())
        for cond in train_conditions:
            data, _ = built[cond.key]
            kept = auditing.select(scores[cond.key], min_score=MIN_SCORE)
            dropped = len(data) - len(kept)
            bad_dropped = int(data.corrupted.sum()) - int(data.corrupted[kept].sum())
            # what dropping the noise rate's share of lowest scores (knowing the rate) would drop
            oracle = sorted(set(range(len(data))) - set(auditing.select(scores[cond.key], drop_bottom=100 * cond.noise)))
            result["filter"].setdefault(cond.key, {})[str(seed)] = dict(
                kept=len(kept), dropped=dropped, corrupted=int(data.corrupted.sum()),
                corrupted_dropped=bad_dropped, corrupted_kept=int(data.corrupted[kept].sum()),
                rate_dropped=len(oracle), rate_corrupted_dropped=int(data.corrupted[oracle].sum()))
            filtered = subset(data, kept)
            runs = {"plain": (data, False), "plain_filtered": (filtered, False), "cal": (data, True),
                    "cal_filtered": (filtered, True)}
            per_image, found = {}, {}
            for method, (train_set, cal) in runs.items():
                steps = max(1, len(train_set) // proto.batch_size)   # one pass over the set
                batches = demo_training.schedule(len(train_set), steps, proto.batch_size, seed=STAGE2_STREAM + seed)
                trained, _ = demo_training.run_stage2(state, seed, train_set, batches, vocab, proto, cal=cal)
                per_image[method] = true_word_logprobs(trained, evalset, vocab).mean(1)
                found[method] = dict(logprob=float(per_image[method].mean()), steps=steps, images=len(train_set))
            found["image_differences"] = {f"{m}-{base}": _moments(per_image[m] - per_image[base]) for m, base in PAIRS}
            result["training"].setdefault(cond.key, {})[str(seed)] = found
            say(f"seed {seed}, {cond.label}: kept {len(kept)} of {len(data)}; log-prob "
                + ", ".join(f"{METHODS[m]} {found[m]['logprob']:+.3f}" for m in METHODS))
    result["seconds"] = time.perf_counter() - t0
    return result


def _moments(x: torch.Tensor) -> dict:
    return dict(n=int(x.numel()), mean=float(x.mean()), sd=float(x.std()) if x.numel() > 1 else 0.0)


def _mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def tables(result: dict) -> str:
    seeds = [str(s) for s in result["protocol"]["seeds"]]
    label = result["conditions"]
    lines = [f"calplug demo --audit: each seed's stage-1 model audits that seed's stage-2 training sets "
             f"({len(seeds)} seeds)",
             "score = mean over the caption's tokens of log p(token | image) - log p(token | without it)", "",
             "AUROC of ranking the contradicting captions lowest (1 = all below every clean caption, 0.5 = chance),",
             "mean +- SE over seeds",
             f"{'condition':<18}" + "".join(f"{name:>16}" for name in SIGNALS.values())]
    for key, per_seed in result["auroc"].items():
        stats = {s: _mean_se([per_seed[x][s] for x in seeds]) for s in SIGNALS}
        lines.append(f"{label[key]:<18}" + "".join(f"{stats[s][0]:>9.3f} +- {stats[s][1]:.3f}"[-16:].rjust(16)
                                                   for s in SIGNALS))
    lines.append("per seed, mean gain at 40 %: " + ", ".join(
        f"seed {x} {result['auroc'][k][x]['mean_gain']:.3f} (stage-1 true-word log-prob {result['stage1'][x]:+.3f})"
        for k in result["auroc"] if k == "0.4" for x in seeds))
    for key, per_seed in result["auroc"].items():
        attrs = [a for a in synthetic.ATTRIBUTES if a in per_seed[seeds[0]]]
        if attrs:
            lines.append(f"  {label[key]}, by the word replaced (mean gain / lowest gain): " + ", ".join(
                f"{a} {statistics.fmean(per_seed[x][a]['mean_gain'] for x in seeds):.3f} / "
                f"{statistics.fmean(per_seed[x][a]['min_gain'] for x in seeds):.3f}" for a in attrs))
    lines += ["", f"the filter (keep score >= {result['min_score']:g}), summed over seeds",
              f"{'condition':<18}{'kept':>8}{'dropped':>9}{'contradicting dropped':>23}{'clean dropped':>15}"
              f"{'contradicting kept':>20}{'bottom-rate precision':>23}"]
    for key, per_seed in result["filter"].items():
        f = {k: sum(per_seed[x][k] for x in seeds) for k in per_seed[seeds[0]]}
        total = f["kept"] + f["dropped"]
        lines.append(f"{label[key]:<18}{f['kept']:>8}{f['dropped']:>9}"
                     f"{f['corrupted_dropped']:>12} of {f['corrupted']:<7}{f['dropped'] - f['corrupted_dropped']:>8} of "
                     f"{total - f['corrupted']:<5}{f['corrupted_kept'] / max(f['kept'], 1):>14.1%} of kept"
                     f"{f['rate_corrupted_dropped'] / max(f['rate_dropped'], 1):>17.1%}")
    lines.append("(bottom-rate precision: of the samples --drop-bottom at the true noise rate would drop, "
                 "the share that contradict their image)")
    lines += ["", "stage-2 training, mean log-probability of the true visual word (clean held-out captions; "
              "higher is better)", f"{'condition':<18}" + "".join(f"{name:>17}" for name in METHODS.values())]
    rows = []
    for key, per_seed in result["training"].items():
        lines.append(f"{label[key]:<18}" + "".join(
            f"{statistics.fmean(per_seed[x][m]['logprob'] for x in seeds):>17.3f}" for m in METHODS))
        for m, base in PAIRS:
            diffs = [per_seed[x][m]["logprob"] - per_seed[x][base]["logprob"] for x in seeds]
            images = [per_seed[x]["image_differences"][f"{m}-{base}"] for x in seeds]
            rows.append((label[key], f"{METHODS[m]} - {METHODS[base]}", demo_verdicts.verdict(diffs, images), diffs))
    lines += ["", "paired by seed (margin: t(0.975, seeds - 1) x SE, at least 1.96 evaluation SEs)",
              f"{'condition':<18}{'difference':<34}{'mean':>8}{'SE':>7}{'margin':>8}  {'verdict':<21}per seed"]
    for cond, name, v, diffs in rows:
        verdict = ("higher" if v["difference"] > v["margin"] else "lower" if v["difference"] < -v["margin"]
                   else "no clear difference")
        lines.append(f"{cond:<18}{name:<34}{v['difference']:>+8.3f}{v['se']:>7.3f}{v['margin']:>8.3f}  {verdict:<21}"
                     + " ".join(f"{d:+.3f}" for d in diffs))
    return "\n".join(lines)




def export_world(out: Path, proto: Protocol, cache: Path | None, threads: int, cond: Condition = Condition(0.4)) -> Path:
    """The first seed's stage-1 model with a processor, and its ``cond`` training set as images
    and a LLaVA JSON, under ``out`` (``calplug audit --model OUT/model --data OUT/train.json``)."""
    from ..testing import tiny_llava_processor
    from .common import quiet_transformers_bars

    seed, vocab = proto.seeds[0], synthetic.Vocab()
    folder = demo_training.usable_cache(cache, proto, threads)
    state = demo_training.load_stage1(folder, seed)
    if state is None:
        state = demo_training.run_stage1(seed, vocab, proto)
        demo_training.save_stage1(folder, seed, state)
    model = demo_training.build_model(seed, vocab, proto)
    model.load_state_dict(state)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(out / "model")
    tiny_llava_processor(vocab.words).save_pretrained(out / "model")
    data, _ = training_set(seed, cond, proto)
    records = []
    for i, (image, caption) in enumerate(zip(data.images, data.captions)):
        image.save(out / "images" / f"{i:05d}.png")
        records.append(dict(id=f"demo-{seed}-{i:05d}", image=f"images/{i:05d}.png", conversations=[
            dict(**{"from": "human", "value": "<image>\n" + " ".join(synthetic.PROMPT)}),
            dict(**{"from": "gpt", "value": " ".join(caption[:-1])})]))   # the template adds <eos>
    (out / "train.json").write_text(json.dumps(records, indent=1))
    (out / "truth.json").write_text(json.dumps(dict(condition=cond.label, seed=seed,
                                                    contradicts=data.corrupted.tolist())))
    return out


def run(args, proto: Protocol, out: Path, cache: Path | None, threads: int) -> int:
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.no_progress else (lambda m: None)
    conditions = {}
    if args.noise is not None:  # shortened runs (tests): the given conditions for both questions
        conditions = dict(auroc_conditions=proto.conditions, train_conditions=proto.conditions)
    result = run_experiment(proto, cache=cache, threads=threads, say=say, **conditions)
    print(tables(result))
    print(f"\nwall time {result['seconds']:.0f} s on {threads} thread(s)", flush=True)
    (out / "audit_results.json").write_text(json.dumps(result, indent=1))
    world = export_world(out / "audit-world", proto, cache, threads)
    print(f"wrote {out / 'audit_results.json'}, {world} (try: calplug audit --model {world / 'model'} "
          f"--data {world / 'train.json'} --out {world / 'audit'} --min-score 0)")
    return 0
